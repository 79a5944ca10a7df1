"""Rotary settings of an HF config as config.ini fields (the runtime's rotary maths is runtime/rope.py)."""
from __future__ import annotations

from .. import QconvError

SUPPORTED = {"default": "none", "linear": "linear", "llama3": "llama3"}


def rope_fields(config) -> dict:
    """rope_theta and rope_scaling{,_factor,_low_freq_factor,_high_freq_factor,_original_max_position_embeddings}."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED:
        raise QconvError(f"rope scaling {kind!r} is not supported by the bundled runtime; "
                         f"supported: {', '.join(SUPPORTED)}")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise QconvError("partial rotary embeddings are not supported by the bundled runtime")
    max_pos = int(config.max_position_embeddings)
    return {
        "rope_theta": float(theta),
        "rope_scaling": SUPPORTED[kind],
        "rope_scaling_factor": float(params.get("factor", 1.0)) if kind != "default" else 1.0,
        "rope_low_freq_factor": float(params.get("low_freq_factor", 1.0)),
        "rope_high_freq_factor": float(params.get("high_freq_factor", 4.0)),
        "rope_original_max_position_embeddings": int(params.get("original_max_position_embeddings", max_pos)),
    }
