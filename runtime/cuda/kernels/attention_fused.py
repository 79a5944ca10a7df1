"""Decode attention fused with rotary (+ q/k norm), the KV-cache write and the merge of the splits, for one-row
steps whose rows are distinct sequences: one launch reads qkv as the qkv GEMV left it (or its fp32 split-K sums)
and writes the attention output. The split, the int8 cache's arithmetic and the partials are attention.py's; an
online cache's write (the new token's codes and (scale, zp)) and read are kv_codes.py's.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRET, pdl
from .arrive import _last_to_arrive
from .attention import LOG2E, _attend, _checked, _combine, _kv_params, _split_size, checked_transform
from .kv_codes import _put_transformed, _rint, param_args


@triton.jit
def _rope_rows(x1, x2, d, cs_ptr, sn_ptr, nw_ptr, eps, dt, D: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """Rows [R, D] of heads -> (optional per-head RMSNorm, then) neox rotary, rounded to dt as the rope kernel
    rounds. x2 is x1 with its halves swapped (column d holds x1's column (d + D/2) % D)."""
    if QK_NORM:  # weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), over D
        r = 1.0 / tl.sqrt(tl.sum(x1 * x1, axis=1) / D + eps)
        x1 = (tl.load(nw_ptr + d).to(tl.float32)[None, :] * (x1 * r[:, None]).to(dt).to(tl.float32)).to(dt)
        x2 = (tl.load(nw_ptr + (d + HALF) % D).to(tl.float32)[None, :] * (x2 * r[:, None]).to(dt).to(tl.float32)).to(dt)
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    c = tl.load(cs_ptr + d)[None, :]  # the tables repeat the half-dim angles: cos[:D/2] == cos[D/2:]
    s = tl.load(sn_ptr + d)[None, :]
    sign = tl.where(d < HALF, -1.0, 1.0)[None, :]  # [a, b] -> [a cos - b sin, b cos + a sin]
    return (x1 * c + sign * (x2 * s)).to(dt).to(tl.float32)


@triton.jit
def _zero_sums(row, qh, d, r_ok, kvh, HQ: tl.constexpr, HKV: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr):
    """Zeroes the q heads (offsets qh, rows r_ok) and k, v heads kvh of one row of the split-K qkv sums."""
    tl.store(row + qh + d[None, :], tl.zeros([REP_PAD, D], tl.float32), mask=r_ok[:, None])
    kv = (HQ + kvh + tl.arange(0, 2) * HKV)[:, None] * D + d[None, :]  # k head kvh, v head kvh
    tl.store(row + kv, tl.zeros([2, D], tl.float32))


@triton.jit
def _attn_fused_kernel(qkv_ptr, stride_t, pos_ptr, slot_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, eps,
                       kc_ptr, vc_ptr, stride_cb, stride_ch, stride_cs, kvp_ptr, kp_ptr, vp_ptr, stride_pb, stride_ph,
                       r_ptr, c_ptr, sk_ptr, sv_ptr, stride_sb, stride_sh,
                       m_ptr, l_ptr, o_ptr, cnt_ptr, out_ptr, stride_ot, qk_scale, HQ: tl.constexpr, HKV: tl.constexpr,
                       D: tl.constexpr,
                       REP: tl.constexpr, REP_PAD: tl.constexpr, RC: tl.constexpr, SC: tl.constexpr,
                       BLOCK_N: tl.constexpr, NS: tl.constexpr, QUANT: tl.constexpr, QK_NORM: tl.constexpr,
                       MERGE: tl.constexpr, FENCE: tl.constexpr, PDL: tl.constexpr, ROUND: tl.constexpr,
                       WIDE: tl.constexpr, I8_REGS: tl.constexpr, SUMS: tl.constexpr, BITS: tl.constexpr,
                       ROT: tl.constexpr, CENTER: tl.constexpr, SINK: tl.constexpr):
    """Rotary + cache write + attention splits + merge of one decode step, for rows that are distinct
    sequences (each row's new K/V is written by the one split that holds its position, which then reads it
    back; no other row reads it). Only the splits that hold keys run; one alone writes the output, several
    leave partials and the last of them to finish (a counter per (row, kv head)) merges them. qkv_ptr may
    be the fp32 split-K sums of the qkv GEMM (SUMS): q, k, v are rounded to the activation dtype (out's) as a
    stored qkv would be, and the sums are zeroed by the combine kernel, or where no combine kernel follows (MERGE
    or NS == 1) by the split that writes the output."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = tl.load(pos_ptr + b)
    length = tl.maximum(p + 1, 0)
    chunk, active = _split_size(length, NS, ROUND)  # whole ROUND-key pieces per split, read BLOCK_N at a time
    if s < tl.maximum(active, 1):  # the others do nothing; split 0 writes a padding row's zeros
        _attn_fused_split(qkv_ptr, stride_t, slot_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, eps, kc_ptr, vc_ptr,
                          stride_cb, stride_ch, stride_cs, kvp_ptr, kp_ptr, vp_ptr, stride_pb, stride_ph, r_ptr, c_ptr,
                          sk_ptr, sv_ptr, stride_sb, stride_sh, m_ptr, l_ptr,
                          o_ptr, cnt_ptr, out_ptr, stride_ot, qk_scale, b, kvh, s, p, length, chunk, active, HQ, HKV,
                          D, REP, REP_PAD, RC, SC, BLOCK_N, NS, QUANT, QK_NORM, MERGE, FENCE, WIDE, I8_REGS, SUMS,
                          BITS, ROT, CENTER, SINK)


@triton.jit
def _attn_fused_split(qkv_ptr, stride_t, slot_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, eps, kc_ptr, vc_ptr, stride_cb,
                      stride_ch, stride_cs, kvp_ptr, kp_ptr, vp_ptr, stride_pb, stride_ph, r_ptr, c_ptr, sk_ptr, sv_ptr,
                      stride_sb, stride_sh, m_ptr, l_ptr, o_ptr, cnt_ptr,
                      out_ptr, stride_ot, qk_scale, b, kvh, s, p, length, chunk, active, HQ: tl.constexpr,
                      HKV: tl.constexpr, D: tl.constexpr,
                      REP: tl.constexpr, REP_PAD: tl.constexpr, RC: tl.constexpr, SC: tl.constexpr,
                      BLOCK_N: tl.constexpr, NS: tl.constexpr, QUANT: tl.constexpr, QK_NORM: tl.constexpr,
                      MERGE: tl.constexpr, FENCE: tl.constexpr, WIDE: tl.constexpr, I8_REGS: tl.constexpr,
                      SUMS: tl.constexpr, BITS: tl.constexpr, ROT: tl.constexpr, CENTER: tl.constexpr,
                      SINK: tl.constexpr):
    """Split s of (row b, kv head kvh) of _attn_fused_kernel, one of the ``active`` splits."""
    HALF: tl.constexpr = D // 2
    dt = out_ptr.dtype.element_ty
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    pc = tl.maximum(p, 0)  # padding rows read row 0 of the tables and use nothing
    r = tl.arange(0, REP_PAD)
    r_ok = r < REP
    d = tl.arange(0, D)
    row = qkv_ptr + b * stride_t
    qh = (kvh * REP + r)[:, None] * D
    q1 = tl.load(row + qh + d[None, :], mask=r_ok[:, None], other=0.0).to(dt).to(tl.float32)
    q2 = tl.load(row + qh + ((d + HALF) % D)[None, :], mask=r_ok[:, None], other=0.0).to(dt).to(tl.float32)
    q = _rope_rows(q1, q2, d, cos_ptr + pc * D, sin_ptr + pc * D, qn_ptr, eps, dt, D, HALF, QK_NORM).to(dt)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    base = slot * stride_cb + kvh * stride_ch
    pbase = slot * stride_pb + kvh * stride_ph  # online: the (scale, zp) of key n at pbase + 2 n
    sbase = slot * stride_sb + kvh * stride_sh  # online with a sink: key n < SINK at sbase + n * D
    if (p >= start) & (p < end):  # this split holds the new token: rotary on k, both into the cache
        one = tl.arange(0, 1)
        kh = (HQ + kvh + one)[:, None] * D
        k1 = tl.load(row + kh + d[None, :]).to(dt).to(tl.float32)
        k2 = tl.load(row + kh + ((d + HALF) % D)[None, :]).to(dt).to(tl.float32)
        k = _rope_rows(k1, k2, d, cos_ptr + pc * D, sin_ptr + pc * D, kn_ptr, eps, dt, D, HALF, QK_NORM)
        v = tl.load(row + (HQ + HKV + kvh + one)[:, None] * D + d[None, :]).to(dt).to(tl.float32)
        dst = base + p * stride_cs + one[:, None] * 0 + d[None, :]
        if BITS:  # online: each head vector's own (scale, zp), after the cache's transform
            center = tl.zeros([D], tl.float32)
            if CENTER:
                center = tl.load(c_ptr + kvh * D + d)
            _put_transformed(tl.reshape(k, [D]), center, kc_ptr + base + p * stride_cs, kp_ptr + pbase + 2 * p,
                             sk_ptr + sbase + p * D, r_ptr, p, dt, D, BITS, ROT, SINK)
            _put_transformed(tl.reshape(v, [D]), tl.zeros([D], tl.float32), vc_ptr + base + p * stride_cs,
                             vp_ptr + pbase + 2 * p, sv_ptr + sbase + p * D, r_ptr, p, dt, D, BITS, ROT, SINK)
        elif QUANT:
            k_scale, k_zp, v_scale, v_zp = _kv_params(kvp_ptr, kvh, HKV)
            tl.store(kc_ptr + dst, tl.minimum(tl.maximum(_rint((k - k_zp) / k_scale), -128.0), 127.0).to(tl.int8))
            tl.store(vc_ptr + dst, tl.minimum(tl.maximum(_rint((v - v_zp) / v_scale), -128.0), 127.0).to(tl.int8))
        else:
            tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty))
    tl.debug_barrier()  # the block's own cache stores are visible to its loads below
    m_i, l_i, acc = _attend(q, kc_ptr, vc_ptr, base, stride_cs, start, end, kvp_ptr, kvh, qk_scale, d, kp_ptr, vp_ptr,
                            pbase, r_ptr, sk_ptr, sv_ptr, sbase, HKV, REP_PAD, D, BLOCK_N, QUANT, WIDE, I8_REGS, BITS,
                            ROT, SINK)
    alone = (MERGE or NS == 1) and active <= 1  # the only split, and no merge kernel follows
    if SUMS and alone:  # this program read the split-K sums last: zero them for the next layer
        _zero_sums(row, qh, d, r_ok, kvh, HQ, HKV, REP_PAD, D)
    o_rows = out_ptr + b * stride_ot + (kvh * REP + r)[:, None] * D + d[None, :]
    if alone:  # no partials to merge
        tl.store(o_rows, tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0).to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None])
    else:
        idx = (b * HQ + kvh * REP + r) * NS + s  # [REP_PAD] into [B, HQ, NS]
        tl.store(m_ptr + idx, m_i, mask=r_ok)
        tl.store(l_ptr + idx, l_i, mask=r_ok)
        tl.store(o_ptr + idx[:, None] * D + d[None, :], acc, mask=r_ok[:, None])
    if MERGE and active > 1:
        if _last_to_arrive(cnt_ptr + b * HKV + kvh, active, FENCE):  # every split's partials are in: merge them
            if SUMS:  # and every split is done with the split-K sums
                _zero_sums(row, qh, d, r_ok, kvh, HQ, HKV, REP_PAD, D)
            rc = tl.arange(0, RC)
            rc_ok = rc < REP
            hb = (b * HQ + kvh * REP + rc) * NS  # [RC]
            # every split's max and sum at once, then the outputs SC splits at a time, unrolled: no chunk
            # waits for the one before, so their loads can all be in flight
            sa = tl.arange(0, NS)
            ok = rc_ok[:, None] & (sa < active)[None, :]  # [RC, NS]
            m_all = tl.load(m_ptr + hb[:, None] + sa[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
            l_all = tl.load(l_ptr + hb[:, None] + sa[None, :], mask=ok, other=0.0, cache_modifier=".cg")
            big = tl.max(m_all, axis=1)  # [RC]; -inf only for the padding lanes of RC
            big = tl.where(big > float("-inf"), big, 0.0)
            den = tl.sum(tl.where(ok, tl.exp2(m_all - big[:, None]), 0.0) * l_all, axis=1)
            num = tl.zeros([RC, D], tl.float32)
            for c in tl.static_range(NS // SC):
                sp = c * SC + tl.arange(0, SC)
                okc = rc_ok[:, None] & (sp < active)[None, :]  # [RC, SC]
                ms = tl.load(m_ptr + hb[:, None] + sp[None, :], mask=okc, other=float("-inf"), cache_modifier=".cg")
                ob = tl.load(o_ptr + (hb[:, None] + sp[None, :])[:, :, None] * D + d[None, None, :],
                             mask=okc[:, :, None], other=0.0, cache_modifier=".cg")  # [RC, SC, D]
                w = tl.where(okc, tl.exp2(ms - big[:, None]), 0.0)
                num += tl.sum(w[:, :, None] * ob, axis=1)
            o = tl.where(den[:, None] > 0, num / den[:, None], 0.0)
            tl.store(out_ptr + b * stride_ot + (kvh * REP + rc)[:, None] * D + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=rc_ok[:, None])


def counters(rows: int, kv_heads: int, device) -> torch.Tensor:
    """The fused kernel's split counters [rows, Hkv] int32; zero between launches (the kernel resets them)."""
    return torch.zeros(rows, kv_heads, device=device, dtype=torch.int32)


def decode_attention_fused(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                           out: torch.Tensor, kv_params: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                           k_norm: torch.Tensor | None = None, eps: float = 0.0,
                           scratch: tuple[torch.Tensor, ...] | None = None, splits: int | None = None,
                           count: torch.Tensor | None = None, block_n: int = 64, num_warps: int = 4,
                           num_stages: int = 2, merge: bool = True, sums: bool = False,
                           split_round: int | None = None, wide: bool = False,
                           int8_in_registers: bool = False,
                           token_params: tuple[torch.Tensor, torch.Tensor] | None = None,
                           kv_transform: tuple | None = None) -> torch.Tensor:
    """rope_cache_write + decode_attention for a decode step whose rows are distinct sequences (cache rows):
    qkv [B, (Hq + 2 Hkv) * D] as the qkv GEMV stored it (not rotated); the new K/V go into the cache at pos,
    and out [B, Hq * D] gets the attention over positions 0..pos. ``merge``: the splits merge in the same
    kernel (one launch; ``count``: counters(B, Hkv)); else a second kernel merges them. ``sums``: qkv is the
    fp32 buffer a split-K qkv GEMM added into, zeroed once every split has read it: by the second kernel, or
    (merge, or one split) by the split that writes the output. ``split_round``: each
    split holds a multiple of this many keys (default block_n), read block_n at a time, e.g. 64-key splits read
    as one 128-key tile (the last half masked where a split holds an odd number of 64-key pieces). ``wide``,
    ``int8_in_registers``, ``token_params`` (an online cache), ``kv_transform``: as decode_attention's."""
    B = qkv.shape[0]
    rnd = split_round or block_n
    assert block_n % rnd == 0, f"split_round {rnd} must divide block_n {block_n}"
    hkv, D, rep, quant, bits, ns, (m, l, acc) = _checked(B, pos, slot, k_cache, v_cache, num_heads, out, kv_params,
                                                         scratch, splits, rnd, token_params)
    assert qkv.stride(-1) == 1 and qkv.shape[1] == (num_heads + 2 * hkv) * D
    assert not sums or qkv.dtype == torch.float32, "split-K sums: fp32"
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape[1] == D and cos.is_contiguous() and sin.is_contiguous()
    count = count if count is not None else counters(B, hkv, qkv.device)
    assert count.dtype == torch.int32 and count.shape[0] >= B and count.shape[1] == hkv and count.is_contiguous()
    targs, tconst = checked_transform(bits, kv_transform, m, hkv, D)
    if B == 0:
        return out
    qk_norm = q_norm is not None
    on = pdl(qkv)
    _attn_fused_kernel[(B, hkv, ns)](
        qkv, qkv.stride(0), pos, slot, cos, sin, q_norm if qk_norm else cos, k_norm if qk_norm else cos, eps,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), kv_params if quant else m,
        *param_args(token_params, m), *targs, m, l, acc, count, out, out.stride(0), LOG2E / math.sqrt(D), HQ=num_heads,
        HKV=hkv, D=D, REP=rep,
        REP_PAD=max(16, triton.next_power_of_2(rep)), RC=triton.next_power_of_2(rep), SC=min(ns, 8), BLOCK_N=block_n,
        NS=ns, QUANT=quant, QK_NORM=qk_norm, MERGE=merge, FENCE=not INTERPRET, PDL=on, ROUND=rnd, WIDE=wide,
        I8_REGS=int8_in_registers, SUMS=sums, BITS=bits, **tconst, num_warps=num_warps, num_stages=num_stages,
        launch_pdl=on)
    if not merge and ns > 1:  # with one split per (row, kv head), it writes the output (and zeroes the sums)
        _combine(m, l, acc, out, pos, num_heads, ns, rnd, on, qkv if sums else None, hkv)
    return out
