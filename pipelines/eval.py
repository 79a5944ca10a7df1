"""`qconv eval --model`: perplexity by BENCH_PROTOCOL (whole text tokenized once, consecutive windows, exp(mean NLL);
convert/perplexity.py) of a model that transformers runs.

With KV params (kv_mode int8-static), K (post-rotary) and V are quantized to int8 and back as they would enter the
cache; with kv_mode int8 / int4, per (token, head) as the online cache write does, int4 with the transform a new
workspace gets (convert/kv_mode.py new_transform; K centers with --kv-params, a calibrate work dir).

The windows go through the model a group at a time and block by block (convert/model_io streams each
block from disk), so host memory holds one block and one group's hidden states, not the model.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import QconvError
from ..convert.arch import get_module
from ..convert.kv_file import load_k_centers, load_kv_params, params_by_layer
from ..convert.kv_mode import KV_MODES, ONLINE_BITS, new_transform
from ..convert.quant import kv_rotation
from ..convert.model_io import LoadedModel, load_model, model_shape, resolve_device
from ..convert.perplexity import PplResult, eval_windows, perplexity
from .data import eval_text
from .hooks import KVFakeQuant, KVTokenFakeQuant, attention_function
from .kv_params import compute_kv_params, load_kv_stats
from .layerwise import Layerwise, iter_blocks

GROUP_BYTES = 1 << 30  # hidden states of the windows that go through the blocks together


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
               kv_mode: str | None = None) -> PplResult:
    """An HF folder, a .gguf or an AWQ/int8 checkpoint, run by transformers (a workspace goes through the
    bundled runtime: runtime/evaluate.py). ``kv_mode`` None: int8-static with ``kv_params``, else fp16.
    ``kv_params`` with int4: a calibrate work dir, whose K statistics give the K centers."""
    kv_mode = kv_mode or ("int8-static" if kv_params is not None else "fp16")
    if kv_mode not in KV_MODES:
        raise QconvError(f"--kv must be one of {', '.join(KV_MODES)}, got {kv_mode!r}")
    if (kv_mode == "int8-static" and kv_params is None) or (kv_mode not in ("int8-static", "int4") and kv_params):
        raise QconvError(f"--kv-params goes with --kv int8-static (needed) and --kv int4 (K centers), and only with "
                         f"them (got --kv {kv_mode} {'with' if kv_params else 'without'} --kv-params)")
    text = eval_text(dataset)
    dev = resolve_device(device)
    lm = load_model(model, dtype=dtype, device=str(dev), trust_remote_code=trust_remote_code)
    ids = eval_windows(text, lm.tokenizer, seqlen, windows)
    logits_fn = block_by_block(lm, ids, dev)

    if kv_mode in ONLINE_BITS:
        shape = model_shape(lm.config)
        centers = load_k_centers(kv_params, shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]) \
            if kv_params else None
        t = new_transform(kv_mode, centers is not None)
        rot = kv_rotation(shape["head_dim"]) if t.rotation == "hadamard" else None
        with attention_function(lm.model, KVTokenFakeQuant(ONLINE_BITS[kv_mode], rot, centers, t.sink)):
            return perplexity(logits_fn, ids, dev, desc=f"eval kv-{kv_mode}")
    if kv_params is None:
        return perplexity(logits_fn, ids, dev)
    params = resolve_kv_params(kv_params, model_shape(lm.config), kv_sym, kv_granularity)
    with attention_function(lm.model, KVFakeQuant(params)):
        return perplexity(logits_fn, ids, dev, desc="eval kv-int8")


def block_by_block(lm: LoadedModel, windows: torch.Tensor, device: torch.device, group_bytes: int = GROUP_BYTES):
    """``logits_fn`` for perplexity(), which asks for the windows in order: each group of windows is run
    through every block (one block on the device at a time), then one window's logits at a time."""
    # windows: [N, S]; a group's hidden states: [n, S, H]
    per_window = windows.shape[1] * lm.config.hidden_size * torch.finfo(lm.dtype).bits // 8
    group = max(1, group_bytes // per_window)
    norm = get_module(lm.model, lm.spec.final_norm)
    if lm.weights is not None:
        lm.weights.fill(norm, lm.spec.final_norm + ".")
    norm.to(device)
    head = lm.tensor(f"{lm.spec.lm_head}.weight").to(device)  # [V, H]
    done = {"next": 0, "start": 0, "run": None}

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        k = done["next"]
        assert torch.equal(x[0].cpu(), windows[k]), "perplexity() asks for the windows in order"
        run = done["run"]
        if run is None or k == done["start"] + run.n:  # run the next group through the blocks
            if run is not None:
                run.close()
            done["run"] = None  # the previous group's states go first
            run = Layerwise(lm, windows[k: k + group], device, batch_size=1)
            for _, block in iter_blocks(lm, device):
                run.run_block(block)
            done["start"], done["run"] = k, run
        done["next"] = k + 1
        h = run.state(k - done["start"]).to(device)  # [1, S, H]
        return F.linear(norm(h), head)  # [1, S, V]
    return logits_fn
