"""`qconv eval`: perplexity by BENCH_PROTOCOL (whole text tokenized once, consecutive windows, exp(mean NLL)).

With KV params, K (post-rotary) and V are quantized to int8 and back as they would enter the cache.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import QconvError
from ..convert.kv_file import load_kv_params, params_by_layer
from ..convert.model_io import load_model, model_shape, resolve_device
from .data import eval_text
from .hooks import KVFakeQuant, attention_function
from .kv_params import compute_kv_params, load_kv_stats


@dataclass(slots=True)
class PplResult:
    ppl: float
    nll: float
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    wall_s: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def eval_windows(text: str, tokenizer, seqlen: int, windows: int | None) -> torch.Tensor:
    """[N, seqlen] consecutive, non-overlapping windows from token 0 (default special tokens)."""
    if seqlen <= 1:
        raise QconvError(f"--seqlen must be at least 2, got {seqlen}")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    avail = ids.numel() // seqlen
    if avail == 0:
        raise QconvError(f"the text has {ids.numel()} tokens, less than one window of {seqlen}")
    n = avail if windows is None else min(windows, avail)
    if windows is not None and windows <= 0:
        raise QconvError(f"--windows must be positive, got {windows}")
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.inference_mode()
def perplexity(logits_fn, windows: torch.Tensor, device: torch.device, desc: str = "eval") -> PplResult:
    """``logits_fn(ids [1, S]) -> logits [1, S, V]``; NLL is summed in float32 over every predicted token."""
    t0 = time.perf_counter()
    total, count = 0.0, 0
    bar = tqdm(windows, desc=desc, unit="win", dynamic_ncols=True)
    for w in bar:
        ids = w[None].to(device)
        logits = logits_fn(ids)[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    nll = total / count
    return PplResult(math.exp(nll), nll, count, windows.shape[0], windows.shape[1], time.perf_counter() - t0)


def resolve_kv_params(spec: str, shape: dict, sym: bool, granularity: str, num_tp: int = 1):
    """--kv-params: a kv_qparams.safetensors file, or a calibrate work dir whose stats are turned into
    params here with --kv-sym / --kv-granularity (no file written)."""
    path = Path(spec)
    if path.is_dir():
        meta, key, value = load_kv_stats(path)
        if model_shape_mismatch(meta["shape"], shape):
            raise QconvError(f"the statistics in {path} come from a different model ({meta['model']}); "
                             f"calibrate this model first")
        return params_by_layer(compute_kv_params(key, value, shape["num_layers"], sym, granularity, num_tp))
    return load_kv_params(path, shape["num_layers"], shape["num_kv_heads"])


def model_shape_mismatch(a: dict, b: dict) -> bool:
    return any(a.get(k) != b.get(k) for k in ("model_type", "num_layers", "num_kv_heads", "head_dim", "hidden_size"))


def eval_model(model: str, dataset: str, seqlen: int = 2048, windows: int | None = None,
               kv_params: str | None = None, kv_sym: bool = False, kv_granularity: str = "head",
               device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               head: str = "auto") -> PplResult:
    """``head`` (workspaces only): the output projection's format, see runtime/loader.load_workspace."""
    if (Path(model) / "config.ini").is_file():  # a qconv convert workspace: through the bundled runtime
        from ..runtime.evaluate import eval_workspace
        return eval_workspace(model, dataset, seqlen, windows, kv_params, device, dtype, head=head)
    if head != "auto":
        raise QconvError(f"--lm-head applies to workspaces; {model} is not one (no config.ini)")
    text = eval_text(dataset)
    dev = resolve_device(device)
    lm = load_model(model, dtype=dtype, device=str(dev), trust_remote_code=trust_remote_code)
    ids = eval_windows(text, lm.tokenizer, seqlen, windows)
    lm.model.to(dev)

    def logits_fn(x):
        return lm.model(input_ids=x, use_cache=False).logits

    if kv_params is None:
        return perplexity(logits_fn, ids, dev)
    params = resolve_kv_params(kv_params, model_shape(lm.config), kv_sym, kv_granularity)
    with attention_function(lm.model, KVFakeQuant(params)):
        return perplexity(logits_fn, ids, dev, desc="eval kv-int8")
