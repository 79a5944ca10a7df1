"""`qconv eval --model`: perplexity by BENCH_PROTOCOL (whole text tokenized once, consecutive windows, exp(mean NLL);
convert/perplexity.py) of a model that transformers runs.

With KV params, K (post-rotary) and V are quantized to int8 and back as they would enter the cache.
"""
from __future__ import annotations

from pathlib import Path

from .. import QconvError
from ..convert.kv_file import load_kv_params, params_by_layer
from ..convert.model_io import load_model, model_shape, resolve_device
from ..convert.perplexity import PplResult, eval_windows, perplexity
from .data import eval_text
from .hooks import KVFakeQuant, attention_function
from .kv_params import compute_kv_params, load_kv_stats


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
               device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> PplResult:
    """An HF folder, a .gguf or an AWQ/int8 checkpoint, run by transformers (a workspace goes through the
    bundled runtime: runtime/evaluate.py)."""
    text = eval_text(dataset)
    dev = resolve_device(device)
    lm = load_model(model, dtype=dtype, device=str(dev), trust_remote_code=trust_remote_code)
    ids = eval_windows(text, lm.tokenizer, seqlen, windows)
    lm.materialize()  # each window runs through the whole model: read every tensor once
    lm.model.to(dev)

    def logits_fn(x):
        return lm.model(input_ids=x, use_cache=False).logits

    if kv_params is None:
        return perplexity(logits_fn, ids, dev)
    params = resolve_kv_params(kv_params, model_shape(lm.config), kv_sym, kv_granularity)
    with attention_function(lm.model, KVFakeQuant(params)):
        return perplexity(logits_fn, ids, dev, desc="eval kv-int8")
