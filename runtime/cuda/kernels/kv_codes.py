"""The online KV modes (convert/kv_mode.py int8, int4) inside the kernels: a head vector quantized as it is
written (rope_cache.py, attention_fused.py) and a tile of codes dequantized as it is read (attention.py).

Write, per (token, kv head), with convert/quant.py kv_token_quantize's algebra and rounding:
    scale = fp16(max((max - min) / (2^bits - 1), KV_SCALE_FLOOR)),  zp = fp16(min),  over the head's D values
    c     = clamp(rint((x - zp) / scale), 0, 2^bits - 1)             (IEEE division, round half to even)
Layout, as runtime/kv_cache.py's (convert/quant.py pack_int4_pairs defines the int4 one):
    codes  [rows, Hkv, S, D * bits / 8] uint8; int4 two per byte, byte j = c[2j] | c[2j + 1] << 4
    params [rows, Hkv, S, 2] float16, (scale, zp) of each token's K (and, a second tensor, V)
Read (attention.py): the dots run over the codes, as the static int8 cache's do; a key's scale and zp fold
into its score (scale * (q . c) + zp * sum(q)), a value's into its probability (p * scale against the codes,
plus p * zp).
A cache with a transform (runtime/kv_cache.py; int4 as convert writes it) stores x' = (x - c) R: the writers
rotate (and center K) before quantizing (_put_transformed), keeping positions < sink in the activation dtype too;
attention takes q R against the codes, reads the sink's keys from their buffer, and rotates its output back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ....convert.quant import KV_SCALE_FLOOR

_FLOOR = tl.constexpr(KV_SCALE_FLOOR)


@triton.jit
def _rint(x):
    """Round half to even (torch.round)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _quantize_head(x, BITS: tl.constexpr):
    """One head vector x [D] fp32 -> (codes [D] fp32 in 0 .. 2^bits - 1, scale, zp), each param as fp16 holds it."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    lo = tl.min(x, axis=0)
    hi = tl.max(x, axis=0)
    scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), _FLOOR).to(tl.float16).to(tl.float32)
    zp = lo.to(tl.float16).to(tl.float32)
    c = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x - zp, scale)), 0.0), QMAX * 1.0)
    return c, scale, zp


@triton.jit
def _store_head(x, codes_ptr, params_ptr, D: tl.constexpr, BITS: tl.constexpr):
    """Quantizes the head vector x [D] fp32 (after rotary) into its codes at codes_ptr (D * bits / 8 bytes) and its
    (scale, zp) at params_ptr; returns x' = c * scale + zp, what the cache now holds, in fp32.
    A per-head orthogonal transform of the head (e.g. a Hadamard rotation before int4) belongs in the caller,
    applied to x before this call, with its inverse on the read side."""
    c, scale, zp = _quantize_head(x, BITS)
    if BITS == 4:
        even, odd = tl.split(tl.reshape(c, [D // 2, 2]))  # c[2j], c[2j + 1]
        tl.store(codes_ptr + tl.arange(0, D // 2), (even + odd * 16.0).to(tl.uint8))
    else:
        tl.store(codes_ptr + tl.arange(0, D), c.to(tl.uint8))
    tl.store(params_ptr, scale.to(tl.float16))
    tl.store(params_ptr + 1, zp.to(tl.float16))
    return c * scale + zp


@triton.jit
def _as_dt(c, dt):
    """Codes 0..255 (uint8, or int32 nibbles) -> the activation dtype. fp16: 1024 + c, the code under fp16 1024's
    exponent (one OR, no conversion; the callers subtract 1024 through the zero points); bf16: c, exact."""
    if dt == tl.float16:
        return (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    return c.to(dt)


@triton.jit
def _code_operands(q, REP_PAD: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(qa, qb, q_sum) for _code_scores: int4 q's even and odd columns [REP_PAD, D/2] (a byte's low and high
    nibble), else q twice; the row sums of q as the dots see it, fp32 [REP_PAD]."""
    if BITS == 4:
        qa, qb = tl.split(tl.reshape(q, [REP_PAD, D // 2, 2]))
    else:
        qa, qb = q, q
    return qa, qb, tl.sum(q.to(tl.float32), axis=1)


@triton.jit
def _params(p_ptr, prows, ok):
    """(scale, zp) fp32 [BN] of the keys whose params are at p_ptr + prows (0 where not ok)."""
    return (tl.load(p_ptr + prows, mask=ok, other=0.0).to(tl.float32),
            tl.load(p_ptr + prows + 1, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _code_scores(q, qa, qb, q_sum, c_ptr, p_ptr, rows, prows, ok, D: tl.constexpr, BITS: tl.constexpr):
    """q . k [REP_PAD, BN] fp32 for the keys whose codes start at c_ptr + rows [BN], k = c * scale + zp:
    scale * (q . c) + zp * sum(q), the dot over the codes (as _as_dt gives them: 1024 + c in fp16, folded into zp).
    int4: the low nibbles against q's even columns plus the high ones against its odd columns."""
    dt = q.dtype
    off = 1024.0 if dt == tl.float16 else 0.0
    s, z = _params(p_ptr, prows, ok)
    if BITS == 4:
        byte = tl.load(c_ptr + rows[:, None] + tl.arange(0, D // 2)[None, :], mask=ok[:, None], other=0)
        qc = tl.dot(qa, tl.trans(_as_dt(byte & 0xF, dt))) + tl.dot(qb, tl.trans(_as_dt(byte >> 4, dt)))
    else:
        c = tl.load(c_ptr + rows[:, None] + tl.arange(0, D)[None, :], mask=ok[:, None], other=0)
        qc = tl.dot(q, tl.trans(_as_dt(c, dt)))
    return qc * s[None, :] + q_sum[:, None] * (z - off * s)[None, :]


@triton.jit
def _code_values(p, c_ptr, p_ptr, rows, prows, ok, D: tl.constexpr, BITS: tl.constexpr):
    """sum_n p_n v_n [REP_PAD, D] fp32 for p [REP_PAD, BN] (activation dtype) over the values whose codes start at
    c_ptr + rows [BN], v = c * scale + zp: the dot of w = p * scale * 2^10 (rounded to the activation dtype; the
    2^10 keeps small products off fp16's subnormals) with the codes, plus sum_n w_n (zp_n / scale_n - 1024 for
    fp16's codes), over 2^10. int4: the low and high nibbles' dots give the even and odd columns."""
    dt = p.dtype
    off = 1024.0 if dt == tl.float16 else 0.0
    s, z = _params(p_ptr, prows, ok)
    w = (p.to(tl.float32) * (s * 1024.0)[None, :]).to(dt)
    zs = tl.where(ok, z / tl.where(ok, s, 1.0), 0.0) - off  # [BN]
    bias = tl.sum(w.to(tl.float32) * zs[None, :], axis=1)  # [REP_PAD]
    if BITS == 4:
        byte = tl.load(c_ptr + rows[:, None] + tl.arange(0, D // 2)[None, :], mask=ok[:, None], other=0)
        even = tl.dot(w, _as_dt(byte & 0xF, dt))
        odd = tl.dot(w, _as_dt(byte >> 4, dt))
        pv = tl.reshape(tl.join(even, odd), [p.shape[0], D])
    else:
        c = tl.load(c_ptr + rows[:, None] + tl.arange(0, D)[None, :], mask=ok[:, None], other=0)
        pv = tl.dot(w, _as_dt(c, dt))
    return (pv + bias[:, None]) * (1.0 / 1024.0)


@triton.jit
def _rotate_rows(x, r_ptr, D: tl.constexpr):
    """x [R, D] fp32 (R >= 16) times R = H / sqrt(D) (convert/quant.py kv_rotation, R R = I), H the +-1 Hadamard
    [D, D] float16 at r_ptr: two fp16 dots on the tensor cores, x's fp16 part and its remainder (exact +-1 products,
    fp32 sums: as near fp32 as x's 22 leading bits), where a broadcast product would hold D x D fp32 in registers."""
    d = tl.arange(0, D)
    h = tl.load(r_ptr + d[:, None] * D + d[None, :])
    hi = x.to(tl.float16)
    lo = (x - hi.to(tl.float32)).to(tl.float16)
    return (tl.dot(hi, h) + tl.dot(lo, h)) * (1.0 / tl.sqrt(D * 1.0))


@triton.jit
def _rotate(x, r_ptr, D: tl.constexpr):
    """x [D] fp32 times R (_rotate_rows on a tile whose other 15 rows are zero)."""
    rows = tl.where(tl.arange(0, 16)[:, None] == 0, x[None, :], 0.0)
    return tl.sum(_rotate_rows(rows, r_ptr, D), axis=0)


@triton.jit
def _put_transformed(x, center, codes_ptr, params_ptr, sink_ptr, r_ptr, p, dt, D: tl.constexpr,
                     BITS: tl.constexpr, ROT: tl.constexpr, SINK: tl.constexpr):
    """Writes the head vector x [D] fp32 (after rotary) into an online cache with its transform (runtime/kv_cache.py
    KVCache.write): x' = (x - center) R (``center`` [D], zeros for V or without centers; R where ROT) is quantized
    at codes_ptr / params_ptr (_store_head), and at a position p < SINK also kept in the activation dtype dt at
    sink_ptr. Returns what attention over the cache then sees for x in the original space: the codes' value
    times R plus the center, or x itself (as dt holds it) at a sink position."""
    y = x - center
    if ROT:
        y = _rotate(y, r_ptr, D)
    if SINK:
        if p < SINK:
            tl.store(sink_ptr + tl.arange(0, D), y.to(dt))
    back = _store_head(y, codes_ptr, params_ptr, D, BITS)
    if ROT:
        back = _rotate(back, r_ptr, D)
    back = back + center
    if SINK:
        back = tl.where(p < SINK, x.to(dt).to(tl.float32), back)
    return back


def transform_args(kv_transform, dummy: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[tuple, dict]:
    """The kernels' arguments for an online cache's transform (runtime/kv_cache.py): ``kv_transform`` (H, the +-1
    Hadamard [D, D] float16 (R sqrt(D), hadamard_pm) or None, k centers [Hkv, D] float32 or None, sink (k, v)
    [rows, Hkv, n, D] or None), or None -> ((h, c, sink k, sink v, sink stride over rows, over heads),
    {ROT, CENTER, SINK})."""
    rot, center, sink = kv_transform if kv_transform is not None else (None, None, None)
    D = head_dim
    assert rot is None or (rot.shape == (D, D) and rot.dtype == torch.float16 and rot.is_contiguous())
    assert center is None or (center.shape == (kv_heads, D) and center.dtype == torch.float32
                              and center.is_contiguous())
    n = 0
    if sink is not None:
        sk, sv = sink
        n = sk.shape[2]
        assert sk.shape == sv.shape and sk.shape[1] == kv_heads and sk.shape[3] == D and sk.stride() == sv.stride()
        assert sk.stride(3) == 1 and sk.stride(2) == D
    args = (dummy if rot is None else rot, dummy if center is None else center, sink[0] if n else dummy,
            sink[1] if n else dummy, sink[0].stride(0) if n else 0, sink[0].stride(1) if n else 0)
    return args, {"ROT": rot is not None, "CENTER": center is not None, "SINK": n}


def hadamard_pm(rot: torch.Tensor) -> torch.Tensor:
    """The kernels' H = R sqrt(D) as float16 (+-1, exact) from the cache's rotation R [D, D]."""
    h = (rot.float() * rot.shape[0] ** 0.5).round()
    assert ((h == 1) | (h == -1)).all(), "the kernels rotate by a +-1 Hadamard over sqrt(D)"
    return h.to(torch.float16).contiguous()


def online_bits(k_cache: torch.Tensor, head_dim: int, token_params) -> int:
    """0 for an fp16 or static int8 cache; 8 or 4 for an online one (uint8 codes, ``token_params`` (k, v) params
    [rows, Hkv, S, 2] float16), checked against the layout above."""
    if k_cache.dtype != torch.uint8:
        assert token_params is None, "token params go with an online (uint8) cache"
        assert k_cache.shape[-1] == head_dim, f"cache width {k_cache.shape[-1]}, head_dim {head_dim}"
        return 0
    bits = 8 * k_cache.shape[-1] // head_dim
    assert bits in (8, 4) and k_cache.shape[-1] * 8 == head_dim * bits, \
        f"codes of {k_cache.shape[-1]} bytes, D {head_dim}"
    assert token_params is not None, "an online cache needs token_params (k params, v params)"
    kp, vp = token_params
    assert kp.shape == vp.shape == (*k_cache.shape[:3], 2) and kp.stride() == vp.stride()
    assert kp.dtype == vp.dtype == torch.float16 and kp.stride(-1) == 1 and kp.stride(2) == 2
    return bits


def param_args(token_params, dummy: torch.Tensor) -> tuple:
    """The kernels' (k params, v params, stride over rows, stride over heads); dummies when there are none."""
    if token_params is None:
        return dummy, dummy, 0, 0
    kp, vp = token_params
    return kp, vp, kp.stride(0), kp.stride(1)
