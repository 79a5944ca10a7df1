"""Quantization maths as pure tensor functions: group qparams, (de)quantize, AWQ packing, int8 KV.

Everything that quantizes (AWQ search, RTN, export, runtime, eval) calls these and never
re-derives a formula. Weights are ``[out, in]`` as in ``nn.Linear`` unless a name says otherwise.
"""
from __future__ import annotations

import torch

# AutoAWQ GEMM packs 8 int4 values per int32; nibble i holds column AWQ_ORDER[i] of each 8-column block.
# [0..7] -> [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # position of column j among the nibbles

# Smallest KV scale: fp16's smallest normal number, so a constant channel never gives 0 or NaN.
KV_SCALE_FLOOR = 2.0 ** -14


# ----------------------------------------------------------------------------------------------
# Weight quantization (grouped along the input dimension)
# ----------------------------------------------------------------------------------------------
def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    # w: [out, in] -> [out, in/g, g]   (group_size <= 0 means one group per output row)
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 else group_size
    assert in_f % g == 0, f"group size {g} does not divide in_features {in_f}"
    return w.reshape(out_f, in_f // g, g)


def group_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool = False,
                  clip_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) for ``w`` [out, in]; both returned as [out, in/g] float32.

    asym: scale = (max - min) / (2^b - 1), zero = clamp(-round(min / scale), 0, 2^b - 1)
    sym:  scale = absmax / (2^(b-1) - 1),   zero = 0
    ``clip_max`` [out, in/g] (optional) replaces the group max magnitude, as AWQ's clip search does.
    """
    wg = _grouped(w.float(), group_size)
    if sym:
        amax = wg.abs().amax(dim=-1)
        if clip_max is not None:
            amax = torch.minimum(amax, clip_max)
        scale = amax.clamp(min=1e-5) / (2 ** (bits - 1) - 1)
        return scale, torch.zeros_like(scale)
    wmax, wmin = wg.amax(dim=-1), wg.amin(dim=-1)
    if clip_max is not None:
        wmax, wmin = torch.minimum(wmax, clip_max), torch.maximum(wmin, -clip_max)
    qmax = 2 ** bits - 1
    scale = (wmax - wmin).clamp(min=1e-5) / qmax
    zero = (-torch.round(wmin / scale)).clamp(0, qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool = False) -> torch.Tensor:
    """Integer codes [out, in] (int32). asym: q = clamp(round(w/s) + z, 0, 2^b-1); sym: clamp(round(w/s), -2^(b-1), 2^(b-1)-1)."""
    g = w.shape[1] // scale.shape[1]
    wg = _grouped(w.float(), g)
    if sym:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2 ** bits - 1
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], lo, hi)
    return q.reshape(w.shape).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w = (q - z) * s, float32 [out, in]."""
    g = q.shape[1] // scale.shape[1]
    qg = _grouped(q.float(), g)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(q.shape)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False,
                  clip_max: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``w`` (same dtype out); the RTN baseline and AWQ's search objective."""
    scale, zero = group_qparams(w, bits, group_size, sym, clip_max)
    return dequantize(quantize(w, scale, zero, bits, sym), scale, zero).to(w.dtype)


# ----------------------------------------------------------------------------------------------
# AutoAWQ GEMM packing: qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]
# ----------------------------------------------------------------------------------------------
def pack_int4_awq(codes: torch.Tensor) -> torch.Tensor:
    """codes int [rows, cols] in 0..15 -> int32 [rows, cols/8], AWQ nibble order."""
    rows, cols = codes.shape
    assert cols % 8 == 0, f"int4 packing needs a multiple of 8 columns, got {cols}"
    # [rows, cols] -> [rows, cols/8, 8], reordered so nibble i holds column AWQ_ORDER[i]
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    packed = (c << shifts).sum(dim=-1)  # < 2^32, fits int64
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack_int4_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] -> int32 [rows, cols] codes in 0..15 (inverse of ``pack_int4_awq``)."""
    rows, n = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed[..., None] >> shifts) & 0xF  # [rows, n, 8], nibble order
    return nib[..., list(AWQ_REVERSE_ORDER)].reshape(rows, n * 8)


def awq_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """From codes q [out, in], scale/zero [out, in/g] to the AutoAWQ GEMM tensors."""
    return {
        "qweight": pack_int4_awq(q.t().contiguous()),          # [in, out/8]
        "qzeros": pack_int4_awq(zero.t().contiguous().round()),  # [in/g, out/8]
        "scales": scale.t().contiguous().to(torch.float16),     # [in/g, out]
    }


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inverse of ``awq_pack``: codes [out, in], scale [out, in/g] float32, zero [out, in/g] float32."""
    q = unpack_int4_awq(qweight).t().contiguous()
    zero = unpack_int4_awq(qzeros).t().contiguous().float()
    return q, scales.t().contiguous().float(), zero


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GPTQ int4 (qweight int32 [in/8, out], sequential nibbles; stored zero = z - 1) -> codes [out, in], scale, zero."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])  # [in, out]
    z = ((qzeros[..., None] >> shifts) & 0xF).reshape(qzeros.shape[0], -1)  # [in/g, out]
    return q.t().contiguous(), scales.t().contiguous().float(), (z + 1).t().contiguous().float()


# ----------------------------------------------------------------------------------------------
# int8 KV cache parameters (LMDeploy v0.1 convention)
# ----------------------------------------------------------------------------------------------
def kv_qparams(vmin: torch.Tensor, vmax: torch.Tensor, absmax: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zp) with the same shape as the inputs.

    asym: zp = (min + max) / 2, scale = (max - min) / 255
    sym:  zp = 0,               scale = absmax / 127
    """
    if sym:
        scale, zp = absmax.float() / 127.0, torch.zeros_like(absmax, dtype=torch.float32)
    else:
        scale, zp = (vmax.float() - vmin.float()) / 255.0, (vmin.float() + vmax.float()) / 2.0
    return scale.clamp(min=KV_SCALE_FLOOR), zp


def kv_reduce(vmin: torch.Tensor, vmax: torch.Tensor, granularity: str, num_tp: int = 1):
    """Reduce per-(head, dim) ranges [H, D] to per-head [H] (over D) or per-layer, one range per
    tensor-parallel shard of H/num_tp contiguous heads, broadcast back to [H]."""
    lo, hi = vmin.amin(dim=-1), vmax.amax(dim=-1)  # [H, D] -> [H]
    if granularity == "layer":
        heads = lo.shape[0]
        assert heads % num_tp == 0, f"num_tp {num_tp} does not divide {heads} heads"
        # [H] -> [tp, H/tp] -> [tp] -> [H]
        lo = lo.reshape(num_tp, -1).amin(dim=1).repeat_interleave(heads // num_tp)
        hi = hi.reshape(num_tp, -1).amax(dim=1).repeat_interleave(heads // num_tp)
    return lo, hi, torch.maximum(-lo, hi)


def kv_quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """q = clamp(round((x - zp) / scale), -128, 127) as int8; scale/zp broadcast against x."""
    return torch.clamp(torch.round((x.float() - zp) / scale), -128, 127).to(torch.int8)


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = q * scale + zp."""
    return (q.float() * scale + zp).to(dtype)


# ----------------------------------------------------------------------------------------------
# online KV cache (kv_mode int8 / int4): one asymmetric (scale, zp) per (token, kv head), taken when it is written
# ----------------------------------------------------------------------------------------------
def kv_token_qparams(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (scale, zp), each [...] float32 holding float16 values (the cache stores them so).

    scale = (max - min) / (2^bits - 1), zp = min, both over D
    """
    lo, hi = x.float().aminmax(dim=-1)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=KV_SCALE_FLOOR)
    return scale.half().float(), lo.half().float()


def kv_token_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D] uint8, scale [...], zp [...]); q = clamp(round((x - zp) / scale), 0, 2^bits - 1)."""
    scale, zp = kv_token_qparams(x, bits)
    q = torch.clamp(torch.round((x.float() - zp[..., None]) / scale[..., None]), 0, 2 ** bits - 1)
    return q.to(torch.uint8), scale, zp


def kv_token_dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = q * scale + zp; q [..., D], scale and zp [...]."""
    return (q.float() * scale[..., None].float() + zp[..., None].float()).to(dtype)


def kv_token_fake_quantize(x: torch.Tensor, bits: int, rot: torch.Tensor | None = None,
                           center: torch.Tensor | None = None, sink: int = 0) -> torch.Tensor:
    """x [..., S, D] quantized per token as the cache write does it and read back, in x's dtype.

    With the int4 cache's transform (kv_rotate): x = unrotate(Q(rotate(x))), and the first ``sink`` positions of S
    are kept as they are (the cache holds them in the compute dtype)."""
    y = kv_rotate(x, rot, center)
    y = kv_unrotate(kv_token_dequantize(*kv_token_quantize(y, bits), torch.float32), rot, center).to(x.dtype)
    if sink:
        y = torch.cat((x[..., :sink, :], y[..., sink:, :]), dim=-2)
    return y


# The int4 cache's transform, before each token is quantized (convert/kv_mode.py):
#   x' = (x - c) R      R [D, D]: block-diagonal normalized Hadamard, symmetric and orthonormal (R R = I)
# Per token, R spreads an outlier channel over all D, so the token's range (its int4 step) shrinks; c, a
# calibrated per-channel K center, takes out what every key shares. Neither changes attention:
#   q . k = (q R) . (k R), and q . (k - c) differs from q . k by q . c, the same for every key of a query, which
#   the softmax drops; V has no center and sum_t p_t v_t = (sum_t p_t v'_t) R.
def hadamard(n: int) -> torch.Tensor:
    """[n, n] Sylvester Hadamard matrix / sqrt(n), n a power of two: H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    assert n > 0 and n & (n - 1) == 0, f"hadamard needs a power of two, got {n}"
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n ** 0.5


def kv_rotation(head_dim: int) -> torch.Tensor:
    """R [D, D]: Hadamard blocks of the largest power of two that divides D (all of D at 64, 128) on the diagonal."""
    block = head_dim & -head_dim
    return torch.block_diag(*[hadamard(block)] * (head_dim // block))


def kv_rotate(x: torch.Tensor, rot: torch.Tensor | None, center: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] -> (x - center) R in float32; ``center`` broadcasts against x, None: 0; ``rot`` None: R = I."""
    x = x.float() if center is None else x.float() - center
    return x if rot is None else x @ rot


def kv_unrotate(y: torch.Tensor, rot: torch.Tensor | None, center: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of kv_rotate: y R + center (R R = I), float32."""
    y = y.float() if rot is None else y.float() @ rot
    return y if center is None else y + center


def pack_int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] uint8 codes 0..15 -> [..., D/2] uint8: byte j = c[2j] | c[2j+1] << 4."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/2] uint8 -> [..., D] uint8, the inverse of pack_int4_pairs."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
