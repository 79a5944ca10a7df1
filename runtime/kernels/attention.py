"""Decode attention over the static KV cache: one new query token per row, keys split across programs.

Program (b, kv head j, split s) takes the query heads j*REP .. j*REP+REP-1 that share kv head j (GQA),
padded to a tl.dot block of REP_PAD rows, and the keys of its split of 0 .. len-1, len = pos[b] + 1
read on the device (so a captured graph serves every length; pos < 0 is a padding row, len 0). The
split size is chosen from len inside the kernel: ceil(len / NS) rounded up to BLOCK_N.
int8 caches (x = q * scale + zp per kv head) are never dequantized element by element:
  scores  q . k  = scale * (q . kq) + zp * sum(q)
  output  sum_n p_n v_n = scale * (p . vq) + zp * sum(p)
and int8 -> fp16 is exact, so the dots run on the tensor cores in the activation dtype. With fp16 the
codes become 1152 + kq by one OR (no int-to-float conversion) and the dots subtract 1152 * sum(q) / sum(p).
Each split leaves (m, l, acc) in log2 units: m = max score, l = sum 2^(score - m), acc = sum 2^(score - m) v;
the combine kernel merges the NS splits: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl

LOG2E = 1.4426950408889634


@triton.jit
def _int8_as(x, dt):
    """int8 codes -> the activation dtype. fp16: (x + 128) | 0x6400 read as fp16 is exactly 1152 + x (no
    conversion instruction; the dots subtract 1152 * sum of the other operand); bf16: converted."""
    if dt == tl.float16:
        return ((x.to(tl.int16) + 128) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return x.to(dt)


@triton.jit
def _attn_split_kernel(q_ptr, stride_qt, pos_ptr, slot_ptr, kc_ptr, vc_ptr, stride_cb, stride_ch, stride_cs, kvp_ptr,
                       m_ptr, l_ptr, o_ptr, qk_scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr,
                       QUANT: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dt = q_ptr.dtype.element_ty
    length = tl.maximum(tl.load(pos_ptr + b) + 1, 0)
    chunk = tl.cdiv(tl.cdiv(length, NS), BLOCK_N) * BLOCK_N
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    r = tl.arange(0, REP_PAD)
    r_ok = r < REP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qt + (kvh * REP + r)[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
    if QUANT:  # kvp: [4, HKV] = k_scale, k_zp, v_scale, v_zp
        k_scale = tl.load(kvp_ptr + kvh)
        k_zp = tl.load(kvp_ptr + HKV + kvh)
        v_scale = tl.load(kvp_ptr + 2 * HKV + kvh)
        v_zp = tl.load(kvp_ptr + 3 * HKV + kvh)
        q_sum = tl.sum(q.to(tl.float32), axis=1)  # [REP_PAD]
    base = tl.load(slot_ptr + b).to(tl.int64) * stride_cb + kvh * stride_ch
    m_i = tl.full([REP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([REP_PAD], tl.float32)
    acc = tl.zeros([REP_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        offs = base + n[:, None] * stride_cs + d[None, :]  # [BN, D]
        k = tl.load(kc_ptr + offs, mask=n_ok[:, None], other=0)
        if QUANT:
            sc = tl.dot(q, tl.trans(_int8_as(k, dt)))  # [REP_PAD, BN] fp32
            if dt == tl.float16:
                sc -= 1152.0 * q_sum[:, None]
            sc = sc * k_scale + k_zp * q_sum[:, None]
        else:
            sc = tl.dot(q, tl.trans(k.to(dt)))
        sc = tl.where(n_ok[None, :], sc * qk_scale, float("-inf"))  # log2 units: score / sqrt(D) * log2(e)
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + offs, mask=n_ok[:, None], other=0)
        p16 = p.to(dt)
        if QUANT:
            pv = tl.dot(p16, _int8_as(v, dt))  # [REP_PAD, D]
            p_sum = tl.sum(p16.to(tl.float32), axis=1)[:, None]
            if dt == tl.float16:
                pv -= 1152.0 * p_sum
            pv = pv * v_scale + v_zp * p_sum
        else:
            pv = tl.dot(p16, v.to(dt))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    idx = (b * HQ + kvh * REP + r) * NS + s  # [REP_PAD] into [B, HQ, NS]
    tl.store(m_ptr + idx, m_i, mask=r_ok)
    tl.store(l_ptr + idx, l_i, mask=r_ok)
    tl.store(o_ptr + idx[:, None] * D + d[None, :], acc, mask=r_ok[:, None])


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, o_ptr, out_ptr, stride_ot, HQ: tl.constexpr, D: tl.constexpr, NS: tl.constexpr,
                         PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b, h = tl.program_id(0), tl.program_id(1)
    base = (b * HQ + h) * NS
    sidx = tl.arange(0, NS)
    d = tl.arange(0, D)
    m = tl.load(m_ptr + base + sidx)
    l = tl.load(l_ptr + base + sidx)
    big = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - big), 0.0)  # empty splits (and padding rows) weigh 0
    acc = tl.load(o_ptr + (base + sidx)[:, None] * D + d[None, :])  # [NS, D]
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * l, axis=0)
    out = tl.where(den > 0, num / den, 0.0)
    tl.store(out_ptr + b * stride_ot + h * D + d, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
def num_splits(rows: int, kv_heads: int, max_len: int, block_n: int = 64, sms: int = 132, cap: int = 64) -> int:
    """Splits per (row, kv head): a power of two giving about two programs per SM, at most one per
    BLOCK_N keys of the longest context and at most ``cap``."""
    ns = 1
    while ns < cap and rows * kv_heads * ns * 2 <= 2 * sms and ns * block_n < max_len:
        ns *= 2
    return ns


def partials(rows: int, heads: int, splits: int, head_dim: int, device) -> tuple[torch.Tensor, ...]:
    """Scratch for ``decode_attention``: m, l [rows, heads, splits] and acc [rows, heads, splits, D], fp32."""
    m = torch.empty(rows, heads, splits, device=device, dtype=torch.float32)
    return m, torch.empty_like(m), torch.empty(rows, heads, splits, head_dim, device=device, dtype=torch.float32)


def decode_attention(q: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, num_heads: int, out: torch.Tensor, kv_params: torch.Tensor | None = None,
                     scratch: tuple[torch.Tensor, ...] | None = None, splits: int | None = None,
                     block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q: [B, >= Hq * D] rows (heads side by side, e.g. the q part of qkv); pos, slot: [B] (the row's new
    position, whose K/V is already in the cache, and its cache row); caches [rows, Hkv, S, D] (int8 with
    kv_params [4, Hkv]); out: [B, Hq * D] = softmax(q k^T / sqrt(D)) v over positions 0..pos."""
    B = q.shape[0]
    hkv, D = k_cache.shape[1], k_cache.shape[-1]
    rep = num_heads // hkv
    assert num_heads % hkv == 0 and q.stride(-1) == 1 and q.shape[1] >= num_heads * D
    assert pos.shape == slot.shape == (B,) and pos.is_contiguous() and slot.is_contiguous()
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert D >= 16 and D & (D - 1) == 0, f"head_dim {D}: a power of two >= 16"
    assert out.shape == (B, num_heads * D) and out.stride(-1) == 1
    quant = k_cache.dtype == torch.int8
    assert not quant or (kv_params is not None and kv_params.shape == (4, hkv) and kv_params.dtype == torch.float32)
    ns = splits or num_splits(B, hkv, k_cache.shape[2], block_n)
    assert ns & (ns - 1) == 0, f"splits {ns}: a power of two"
    m, l, acc = scratch if scratch is not None else partials(B, num_heads, ns, D, q.device)
    assert m.shape[0] >= B and m.shape[1:] == (num_heads, ns) and acc.shape[1:] == (num_heads, ns, D)
    if B == 0:
        return out
    on = pdl(q)
    _attn_split_kernel[(B, hkv, ns)](
        q, q.stride(0), pos, slot, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        kv_params if quant else m, m, l, acc, LOG2E / math.sqrt(D), HQ=num_heads, HKV=hkv, D=D, REP=rep,
        REP_PAD=max(16, triton.next_power_of_2(rep)), BLOCK_N=block_n, NS=ns, QUANT=quant, PDL=on, num_warps=num_warps,
        num_stages=num_stages, launch_pdl=on)
    _attn_combine_kernel[(B, num_heads)](m, l, acc, out, out.stride(0), HQ=num_heads, D=D, NS=ns, PDL=on, num_warps=2,
                                         launch_pdl=on)
    return out
