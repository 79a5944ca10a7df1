"""The int8 KV params file, ``kv_qparams.safetensors``: written by `qconv kv-params`, installed into a workspace by
`qconv convert` / `qconv kv-params --workspace`, read by `qconv eval --kv-params` and the runtime.

  "layers.{i}.{k_scale|k_zp|v_scale|v_zp}"  each [kv_heads] float32
"""
from __future__ import annotations

import torch

from .. import QconvError
from .fileio import load_tensors

KV_FILE = "kv_qparams.safetensors"
PARAM_NAMES = ("k_scale", "k_zp", "v_scale", "v_zp")


def params_by_layer(params: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, ...]]:
    """{layer: (k_scale, k_zp, v_scale, v_zp)} from the flat safetensors dict."""
    layers = sorted({int(k.split(".")[1]) for k in params})
    return {i: tuple(params[f"layers.{i}.{n}"] for n in PARAM_NAMES) for i in layers}


def load_kv_params(path, num_layers: int, num_kv_heads: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """Read kv_qparams.safetensors and check it fits a model of this shape."""
    params = load_tensors(path, "KV params")
    layers = {int(k.split(".")[1]) for k in params if k.startswith("layers.")}
    if layers != set(range(num_layers)):
        raise QconvError(f"KV params {path} do not fit this model: they hold {len(layers)} layers, "
                         f"the model has {num_layers}; compute them for this model with qconv kv-params")
    for i in range(num_layers):
        for n in PARAM_NAMES:
            t = params.get(f"layers.{i}.{n}")
            if t is None or tuple(t.shape) != (num_kv_heads,):
                raise QconvError(f"KV params {path} do not fit this model ({num_layers} layers x {num_kv_heads} KV "
                                 f"heads): layers.{i}.{n} is {None if t is None else list(t.shape)}")
    return params_by_layer(params)
