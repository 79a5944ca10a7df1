"""Shared bits of the bench scripts: provenance for every number (date, machine, commit, command)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """Date, machine, commit and command of a run. QCONV_COMMIT names the commit where git cannot (a copy of
    the tree on a lent device machine carries stale git metadata): export QCONV_COMMIT=$(git rev-parse --short
    HEAD) here, pass it in the device command."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": os.environ.get("QCONV_COMMIT") or _git_commit(Path(__file__).resolve().parent.parent),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        if dirty.strip():
            commit += "+dirty"
    except OSError:
        commit = "unknown"
    return commit


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def save_device_result(name: str, payload: dict) -> Path:
    """A GPU probe's result with its provenance and device name -> bench/results/<name>.json, copied to $OUT
    when set (what a lent device machine sends back)."""
    payload.update(provenance())
    payload["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = write_result(name, payload)
    if os.environ.get("OUT"):
        shutil.copy(out, os.environ["OUT"])
    return out


def random_model_folder(config_path: str, tokenizer_dir: str, out: Path, dtype=torch.float16) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    raw = json.loads(Path(config_path).read_text())
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # init where it is fast
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)  # _init_weights: normal(0, 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def stub_datasets() -> None:
    """AutoAWQ imports `datasets` at load time; the GPU box lacks it. Given token windows, AutoAWQ never
    calls it, so an empty stand-in module is enough there (bench only; the package depends on datasets)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        import types

        stub = types.ModuleType("datasets")
        stub.load_dataset = None
        sys.modules["datasets"] = stub


def ppl_parser(group_size: int, windows: int) -> argparse.ArgumentParser:
    """The arguments every perplexity bench takes: the GGUF model, wiki.utf8, device, group size, windows."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--wiki", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--group-size", type=int, default=group_size)
    ap.add_argument("--windows", type=int, default=windows)
    return ap
