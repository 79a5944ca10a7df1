"""Shared bits of the bench scripts: provenance for every number (date, machine, commit, command), result
files, a random-weight model of a real config."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, flush=True)


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
        "command": command(),
    }


def command() -> str:
    """The command line of this run, as ``python3 -m bench.NAME ARGS`` when run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *script, *sys.argv[1:]])


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
