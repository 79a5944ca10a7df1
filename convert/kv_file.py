"""The int8 KV params file, ``kv_qparams.safetensors``: written by `qconv kv-params`, installed into a workspace by
`qconv convert` / `qconv kv-params --workspace`, read by `qconv eval --kv-params` and the runtime; and the int4
cache's K centers, kv_center.safetensors (below).

  "layers.{i}.{k_scale|k_zp|v_scale|v_zp}"  each [kv_heads] float32
"""
from __future__ import annotations

from pathlib import Path

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


# ----------------------------------------------------------------------------------------------
# int4 K centers (convert/kv_mode.py KVTransform.k_center)
# ----------------------------------------------------------------------------------------------
CENTER_FILE = "kv_center.safetensors"   # in a workspace: "layers.{i}.k_center" [kv_heads, head_dim] float32
KEY_STATS_FILE = "key_stats.safetensors"  # in a calibrate work dir: "layers.{i}.{min|max|mean}" [kv_heads, head_dim]


def load_k_centers(source, num_layers: int, kv_heads: int, head_dim: int) -> dict[int, torch.Tensor]:
    """{layer: c [kv_heads, head_dim]}, K's per-channel center after rotary: from a calibrate work dir, the mean
    of K over the positions after the first (the sink's); from an older work dir without it, (min + max) / 2;
    or from a kv_center.safetensors (bench/RESULTS.md compares the two centers)."""
    path = Path(source)
    if path.is_dir():
        if not (path / KEY_STATS_FILE).is_file():
            raise QconvError(f"no {KEY_STATS_FILE} in {path}; run qconv calibrate --model M --work-dir {path} first")
        t = load_tensors(path / KEY_STATS_FILE, "key statistics")
        t = {f"layers.{i}.k_center": t[f"layers.{i}.mean"].float() if f"layers.{i}.mean" in t
             else (t[f"layers.{i}.min"] + t[f"layers.{i}.max"]).float() / 2
             for i in range(num_layers)
             if f"layers.{i}.mean" in t or (f"layers.{i}.min" in t and f"layers.{i}.max" in t)}
    else:
        t = load_tensors(path, "K centers")
    for i in range(num_layers):
        c = t.get(f"layers.{i}.k_center")
        if c is None or tuple(c.shape) != (kv_heads, head_dim):
            raise QconvError(f"K centers from {path} do not fit this model ({num_layers} layers x [{kv_heads}, "
                             f"{head_dim}]): layer {i} has {None if c is None else list(c.shape)}; calibrate this "
                             f"model (qconv calibrate --work-dir W) and pass W")
    return {i: t[f"layers.{i}.k_center"].float() for i in range(num_layers)}


def k_center_tensors(centers: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kv_center.safetensors dict of {layer: c}."""
    return {f"layers.{i}.k_center": c.contiguous() for i, c in centers.items()}
