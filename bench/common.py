"""Shared bits of the bench scripts: provenance for every number (date, machine, commit, command), result
files, a random-weight model of a real config."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from qconv.convert.arch import get_arch
from qconv.convert.layout import QuantLinear
from qconv.convert.workspace import ConvertRequest, convert_workspace

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


def saved(prefix: str) -> list[dict]:
    """Every bench/results/<prefix>_*.json, in name order (a script's per-size records, for its --table)."""
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}_*.json"))]


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

class RandomCheckpoint:
    """A stand-in for convert/checkpoint.Checkpoint whose tensors are drawn when asked: normal(0, 0.02) floats
    (norms 1), or with ``int4`` uniform int4 codes around zero point 8 whose scale gives the same spread. For
    model sizes whose fp16 checkpoint the disk cannot hold: convert_workspace(req, checkpoint=...) writes the
    workspace layer by layer from it. ``config``: the HF config.json as a dict."""

    def __init__(self, config: dict, int4: bool, group: int, seed: int = 0):
        self.config, self.int4, self.group, self.seed = config, int4, group, seed
        self.fmt = "awq" if int4 else "hf"

    def _gen(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + sum(map(ord, name)) * 7919 + len(name))

    def __contains__(self, name: str) -> bool:
        return not name.endswith(".bias") or self.bias(name[:-len(".bias")]) is not None

    def get(self, name: str) -> torch.Tensor:
        c = self.config
        H = c["hidden_size"]
        if name.endswith("norm.weight"):
            qk = name.endswith(("q_norm.weight", "k_norm.weight"))
            return torch.ones(c.get("head_dim") or H // c["num_attention_heads"] if qk else H, dtype=torch.float16)
        return (torch.randn(c["vocab_size"], H, generator=self._gen(name)) * 0.02).to(torch.float16)  # embed, head

    def bias(self, prefix: str) -> torch.Tensor | None:
        """q/k/v biases, normal(0, 0.02), where the config has them (attention_bias, else the architecture's
        default: qwen2's); no other linear has one."""
        c = self.config
        if not prefix.endswith(("q_proj", "k_proj", "v_proj")):
            return None
        if not c.get("attention_bias", get_arch(c["model_type"]).qkv_bias):
            return None
        D = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        heads = c["num_attention_heads"] if prefix.endswith("q_proj") else c["num_key_value_heads"]
        return (torch.randn(heads * D, generator=self._gen(prefix + ".bias")) * 0.02).to(torch.float16)

    def linear(self, prefix: str, out_f: int, in_f: int):
        g = self._gen(prefix)
        if not self.int4:
            return (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.float16)
        codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
        scale = torch.full((out_f, in_f // self.group), 0.02 / 4.6)  # uniform 0..15 around 8: std 4.6 codes
        return QuantLinear(codes, scale, torch.full_like(scale, 8.0))


def random_workspace(config: dict, tokenizer_dir: str, dst: Path, weight_type: str, group: int, session_len: int,
                     batch: int, kv_mode: str | None = None) -> Path:
    """A workspace of random weights for ``config`` (an HF config.json as a dict), written straight from
    RandomCheckpoint: fp16 weights, or (``weight_type`` int4) int4 codes, group ``group``. Holds one layer at a
    time: any model size whose int4 workspace the disk holds. ``kv_mode``: convert's --kv (None: fp16)."""
    from transformers import AutoTokenizer
    src = dst.parent / f"{dst.name}.src"
    src.mkdir(parents=True, exist_ok=True)
    raw = dict(config, torch_dtype="float16")
    if weight_type == "int4":
        raw["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                                      "zero_point": True}
    (src / "config.json").write_text(json.dumps(raw))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    req = ConvertRequest(str(src), str(dst), weight_type=weight_type, session_len=session_len, max_batch_size=batch,
                         force=True, kv_mode=kv_mode)
    convert_workspace(req, log=lambda *_: None, checkpoint=RandomCheckpoint(raw, weight_type == "int4", group))
    shutil.rmtree(src)
    return dst
