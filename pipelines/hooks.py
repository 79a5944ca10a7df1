"""Observers as context managers: they install hooks on enter and always remove them on exit."""
from __future__ import annotations

import contextlib
import itertools

import torch

from ..convert.arch import ArchSpec, get_module
from ..convert.quant import kv_dequantize, kv_quantize, kv_token_fake_quantize
from .stats import ChannelStats, head_minmax, merge_minmax

_ids = itertools.count()


@contextlib.contextmanager
def attention_function(model, fn):
    """Route every attention call of ``model`` through ``fn(base, module, q, k, v, mask, **kw)``.

    This uses transformers' own extension point (AttentionInterface): q and k arrive after rotary
    embedding, k and v before GQA repetition, exactly what a KV cache holds. ``base`` is the
    attention the model was loaded with (sdpa).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = model.config
    previous = cfg._attn_implementation
    base = ALL_ATTENTION_FUNCTIONS.get(previous) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    name = f"qconv_{next(_ids)}"
    ALL_ATTENTION_FUNCTIONS[name] = lambda module, q, k, v, mask, **kw: fn(base, module, q, k, v, mask, **kw)
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = previous
        del ALL_ATTENTION_FUNCTIONS[name]


class KVObserver:
    """Per-layer min/max of K (post-rotary) and V per (kv_head, head_dim), and K's mean over the positions after
    the first (int4's K center; position 0, the attention sink, is kept unquantized). Use with
    ``attention_function``."""

    def __init__(self):
        self.key: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.value: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key_sum: dict[int, tuple[torch.Tensor, int]] = {}  # layer -> (sum [H_kv, D] float32, count)

    def __call__(self, base, module, q, k, v, mask, **kw):
        # k, v: [B, H_kv, S, D]
        i = module.layer_idx
        self.key[i] = merge_minmax(self.key.get(i), head_minmax(k))
        self.value[i] = merge_minmax(self.value.get(i), head_minmax(v))
        if k.shape[2] > 1:
            total, n = self.key_sum.get(i, (0.0, 0))
            self.key_sum[i] = (total + k[:, :, 1:].sum(dim=(0, 2), dtype=torch.float32),
                               n + k.shape[0] * (k.shape[2] - 1))
        return base(module, q, k, v, mask, **kw)

    def key_mean(self, i: int) -> dict[str, torch.Tensor]:
        """{"mean": K's mean [H_kv, D] over the positions after the first} of layer i, or {}."""
        if i not in self.key_sum:
            return {}
        total, n = self.key_sum[i]
        return {"mean": (total / n).cpu()}


class KVFakeQuant:
    """Quantize K and V to int8 and back as they would enter the cache, with per-layer params.

    ``params[layer] = (k_scale, k_zp, v_scale, v_zp)``, each [H_kv] (one value per head).
    """

    def __init__(self, params: dict[int, tuple[torch.Tensor, ...]]):
        self.params = params

    def __call__(self, base, module, q, k, v, mask, **kw):
        ks, kz, vs, vz = (p.to(k.device)[None, :, None, None] for p in self.params[module.layer_idx])
        k = kv_dequantize(kv_quantize(k, ks, kz), ks, kz, k.dtype)
        v = kv_dequantize(kv_quantize(v, vs, vz), vs, vz, v.dtype)
        return base(module, q, k, v, mask, **kw)


class KVTokenFakeQuant:
    """Quantize K and V per (token, head) to ``bits`` and back as the online cache write does (kv_mode int8 / int4:
    one asymmetric fp16 (scale, zp) per token and head, convert/quant.py kv_token_quantize), with the cache's
    transform: ``rot`` [D, D] or None, ``k_centers`` {layer: [H_kv, D]} or None, the first ``sink`` positions kept
    (convert/kv_mode.py KVTransform). Each call holds a whole sequence from position 0, as eval's windows do."""

    def __init__(self, bits: int, rot: torch.Tensor | None = None,
                 k_centers: dict[int, torch.Tensor] | None = None, sink: int = 0):
        self.bits, self.rot, self.k_centers, self.sink = bits, rot, k_centers, sink

    def __call__(self, base, module, q, k, v, mask, **kw):
        # k, v: [B, H_kv, S, D], quantized over D
        rot = None if self.rot is None else self.rot.to(k.device)
        c = None if self.k_centers is None else self.k_centers[module.layer_idx].to(k.device)[:, None, :]  # [H, 1, D]
        k = kv_token_fake_quantize(k, self.bits, rot, c, self.sink)
        v = kv_token_fake_quantize(v, self.bits, rot, None, self.sink)
        return base(module, q, k, v, mask, **kw)


@contextlib.contextmanager
def _side(stream, x: torch.Tensor):
    """Run the block on ``stream`` once it has seen the work that produced ``x`` (no-op without a stream)."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(x.device))
    x.record_stream(stream)  # x's memory stays valid until the side stream is done with it
    with torch.cuda.stream(stream):
        yield


@contextlib.contextmanager
def observe_linear_inputs(layer: torch.nn.Module, spec: ArchSpec, store: dict[str, ChannelStats],
                          stream: "torch.cuda.Stream | None" = None):
    """Accumulate ChannelStats of every linear input of one block into ``store``, keyed by input group.

    Linears that read the same tensor (q/k/v, gate/up) are observed once, on the group's first linear.
    With a CUDA ``stream`` the (memory-bound) reductions run there, beside the block's matmuls.
    """
    handles = []
    for group in spec.input_groups:
        def hook(_mod, args, key=group[0]):
            x = args[0]
            with _side(stream, x):
                s = ChannelStats.of(x)
                store[key] = store[key].merge(s) if key in store else s
        handles.append(get_module(layer, group[0]).register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
