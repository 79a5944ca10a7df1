"""KV cache modes: what config.ini's ``kv_mode`` names, how it relates to ``quant_policy``, and what a token costs.

  kv_mode      cache holds                              params                         quant_policy  LMDeploy's
  fp16         K, V in the compute dtype                none                           0             0
  int8-static  int8 codes                               calibrated, per (layer, head)  4             (dropped)
  int8         uint8 codes, x = c * scale + zp          per (token, head), fp16        0             8
  int4         4-bit codes, two per byte (transformed)  per (token, head), fp16        0             4

``quant_policy`` keeps the meaning it always had here: 4 = calibrated static int8 params are installed, 0 = none.
That differs from LMDeploy, whose quant_policy 4 and 8 are online per-token int4 and int8 (our kv_mode int4 and
int8). A config.ini without kv_mode (written before it existed) reads as quant_policy says: 4 -> int8-static,
0 -> fp16.

An online cache may transform K and V around each token's quantization (config.ini's kv_rotation, kv_sink,
kv_k_center; convert/quant.py kv_rotate has the maths). New int4 caches rotate each head's K and V by a Hadamard
matrix; with calibrated K centers (kv_center.safetensors, from qconv calibrate's K min/max) they also subtract the
center from K and keep the first position (the attention sink) in the compute dtype. The int8 modes take none, and a
config.ini without these keys (written before them) means none, as before.
"""
from __future__ import annotations

from dataclasses import dataclass

KV_MODES = ("fp16", "int8-static", "int8", "int4")
ONLINE_BITS = {"int8": 8, "int4": 4}  # online modes: bits per code
PARAM_BYTES = 2                       # online modes: scale and zp are each stored as float16
STATIC_POLICY = 4                     # quant_policy of int8-static; every other mode has 0
KV_ROTATIONS = ("none", "hadamard")
SINK_TOKENS = 1                       # int4 with K centers: positions 0..SINK_TOKENS-1 kept in the compute dtype


@dataclass(frozen=True, slots=True)
class KVTransform:
    """What an online cache does around each token's quantization: x' = (x - c) R, then per-token codes."""
    rotation: str = "none"   # none | hadamard: R = convert/quant.py kv_rotation(head_dim), on K and V
    sink: int = 0            # the first ``sink`` positions are held in the compute dtype (after the transform)
    k_center: bool = False   # K minus a calibrated per-(layer, kv head, channel) center c

    @property
    def identity(self) -> bool:
        return self == KVTransform()


def new_transform(kv_mode: str, centered: bool) -> KVTransform:
    """What convert and eval give a new cache of ``kv_mode``; ``centered``: calibrated K centers are at hand.
    int4: Hadamard, and with centers the center and a sink. Centering without the sink was worse than neither
    (the sink's key lies far from the center, so its int4 step grows); the sink alone did not help."""
    if kv_mode != "int4":
        return KVTransform()
    return KVTransform("hadamard", SINK_TOKENS if centered else 0, centered)


def mode_of_policy(quant_policy: int) -> str:
    """The kv_mode of a config.ini that predates the key."""
    return "int8-static" if quant_policy == STATIC_POLICY else "fp16"


def policy_of_mode(kv_mode: str) -> int:
    return STATIC_POLICY if kv_mode == "int8-static" else 0


def mode_problem(kv_mode: str, head_dim: int) -> str | None:
    """What is wrong with this mode for this head size, or None."""
    if kv_mode not in KV_MODES:
        return (f"kv_mode {kv_mode!r} is not known to this qconv version (it knows {', '.join(KV_MODES)}); "
                f"upgrade qconv, or recreate the workspace with qconv convert --kv")
    if kv_mode == "int4" and head_dim % 2:
        return f"an int4 KV cache packs two codes per byte and needs an even head_dim, got {head_dim}; use --kv int8"
    return None


def transform_problem(kv_mode: str, t: KVTransform) -> str | None:
    """What is wrong with this transform for this mode, or None."""
    if t.rotation not in KV_ROTATIONS:
        return f"kv_rotation must be one of {', '.join(KV_ROTATIONS)}, got {t.rotation!r}"
    if t.sink < 0:
        return f"kv_sink must be 0 or more, got {t.sink}"
    if not t.identity and kv_mode not in ONLINE_BITS:
        return f"kv_rotation, kv_sink and kv_k_center apply to the online modes (int8, int4), not kv_mode {kv_mode}"
    return None


def bytes_per_token(kv_mode: str, num_layers: int, kv_heads: int, head_dim: int, float_bytes: int = 2) -> int:
    """Bytes the cache spends on one token (K and V, every layer and KV head), per-token params included.
    ``float_bytes``: the element size of the compute dtype, which an fp16-mode cache stores. Static int8 params are
    per (layer, head), not per token, so they cost nothing here; nor do an int4 cache's sink positions (kv_sink per
    sequence, held in the compute dtype), a fixed cost of each sequence."""
    if kv_mode == "fp16":
        per_head = head_dim * float_bytes
    elif kv_mode == "int8-static":
        per_head = head_dim
    else:  # codes (bits / 8 bytes each) + scale + zp
        per_head = head_dim * ONLINE_BITS[kv_mode] // 8 + 2 * PARAM_BYTES
    return 2 * num_layers * kv_heads * per_head
