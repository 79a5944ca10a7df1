"""Decode attention over the static KV cache: one new query token per row, keys split across programs.

Program (b, kv head j, split s) takes the query heads j*REP .. j*REP+REP-1 that share kv head j (GQA),
padded to a tl.dot block of REP_PAD rows, and the keys of its split of 0 .. len-1, len = pos[b] + 1
read on the device (so a captured graph serves every length; pos < 0 is a padding row, len 0). The
split size is chosen from len inside the kernel: ceil(len / NS) rounded up to BLOCK_N.
int8 caches (x = q * scale + zp per kv head) are never dequantized element by element:
  scores  q . k  = scale * (q . kq) + zp * sum(q)
  output  sum_n p_n v_n = scale * (p . vq) + zp * sum(p)
and int8 -> fp16 is exact, so the dots run on the tensor cores in the activation dtype. With fp16 the
codes become 1152 + kq by one OR (no int-to-float conversion), which moves the zero points by -1152 scale.
The dots see codes only: scale and zero point of K fold into each score's one FMA, and V's are applied once
after the last tile (sum(p) is l, summed over p as rounded for the dot).
Online caches (kv_mode int8, int4: uint8 codes, int4 two per byte, with (scale, zp) per token) take the same
algebra per key (kv_codes.py): the dots run over the codes, and each key's scale and zero point fold into its
score, or into its probability for the p.v dot.
Each split leaves (m, l, acc) in log2 units: m = max score, l = sum 2^(score - m), acc = sum 2^(score - m) v;
the combine kernel merges the NS splits: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
attention_fused.py runs the same splits fused with rotary, the cache write and the merge.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRET, pdl
from .kv_codes import (_code_operands, _code_scores, _code_values, _rotate_rows, online_bits, param_args,
                       transform_args)

LOG2E = 1.4426950408889634


# int8 -> fp16 1152 + x, four codes at a time: x ^ 0x80 is x + 128 as an unsigned byte, and PRMT puts each byte under
# 0x64 (fp16 1024 + byte): one LOP3 and two PRMT per four codes, where the elementwise form compiled to ~2 per code
_I8_F16 = tl.constexpr("{ .reg .b32 t, m; xor.b32 t, $2, 0x80808080; mov.b32 m, 0x64646464; "
                       "prmt.b32 $0, t, m, 0x4140; prmt.b32 $1, t, m, 0x4342; }")
_ASM = tl.constexpr(not INTERPRET)


@triton.jit
def _int8_as(x, dt, IN_REGISTERS: tl.constexpr = False):
    """int8 codes -> the activation dtype. fp16: (x + 128) | 0x6400 read as fp16 is exactly 1152 + x (no
    conversion instruction; the dots subtract 1152 * sum of the other operand), packed four at a time through
    inline PTX on the GPU; bf16: converted. IN_REGISTERS: convert where the codes were loaded (a cache tile), so
    that the tl.dot operand reaches shared memory as fp16 and is read back by LDSM, as an fp16 cache is; else
    Triton keeps the int8 tile in shared memory and gathers its bytes along the dot's K (64 LDS.U8 a thread for V)
    before converting. The asm marked impure is what keeps Triton from moving it past the layout conversion.
    Fewer instructions in the hot loop, but slower: a tile loaded into registers is not copied to shared memory
    asynchronously, so the next tile's load no longer overlaps this one's dots. Off by default."""
    if dt == tl.float16:
        if _ASM:
            return tl.inline_asm_elementwise(_I8_F16, "=r,=r,r", [x], dtype=tl.float16, is_pure=not IN_REGISTERS,
                                             pack=4)
        return ((x.to(tl.int16) + 128) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return x.to(dt)


@triton.jit
def _kv_params(kvp_ptr, kvh, HKV: tl.constexpr):
    """(k_scale, k_zp, v_scale, v_zp) of kv head kvh from kvp [4, HKV]."""
    return (tl.load(kvp_ptr + kvh), tl.load(kvp_ptr + HKV + kvh), tl.load(kvp_ptr + 2 * HKV + kvh),
            tl.load(kvp_ptr + 3 * HKV + kvh))


@triton.jit
def _tile(q, qa, qb, q_sum, kc_ptr, vc_ptr, base, stride_cs, kp_ptr, vp_ptr, pbase, n0, end, d, qk_k, bias, m_i, l_i,
          acc, BN: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, I8_REGS: tl.constexpr, BITS: tl.constexpr):
    """One tile of BN keys from n0 (those < end) into the running (m, l, acc). Scores in log2 units: the dot
    times qk_k, plus ``bias`` per row for an int8 cache (its zero point and the fp16 codes' 1152, folded).
    l sums the probabilities as rounded for the p.v dot, so that an int8 cache's V zero point can be applied
    once after the last tile (v_zp * l) and the dots see codes only. BITS: an online cache, its codes at
    base + n * stride_cs and their (scale, zp) at pbase + 2 n; the dots see codes too (kv_codes._code_scores,
    _code_values), with qa, qb (int4: q's even and odd columns) and q_sum (q's row sums)."""
    dt = q.dtype
    n = n0 + tl.arange(0, BN)
    n_ok = n < end
    offs = base + n[:, None] * stride_cs + d[None, :]  # [BN, D]
    if BITS:
        sc = _code_scores(q, qa, qb, q_sum, kc_ptr, kp_ptr, base + n * stride_cs, pbase + 2 * n, n_ok, D, BITS) * qk_k
    else:
        k = tl.load(kc_ptr + offs, mask=n_ok[:, None], other=0)
        if QUANT:
            sc = tl.dot(q, tl.trans(_int8_as(k, dt, I8_REGS))) * qk_k + bias[:, None]  # [REP_PAD, BN] fp32
        else:
            sc = tl.dot(q, tl.trans(k.to(dt))) * qk_k
    sc = tl.where(n_ok[None, :], sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p16 = tl.exp2(sc - m_new[:, None]).to(dt)
    l_i = l_i * alpha + tl.sum(p16.to(tl.float32), axis=1)
    if BITS:
        pv = _code_values(p16, vc_ptr, vp_ptr, base + n * stride_cs, pbase + 2 * n, n_ok, D, BITS)
    else:
        v = tl.load(vc_ptr + offs, mask=n_ok[:, None], other=0)
        if QUANT:
            pv = tl.dot(p16, _int8_as(v, dt, I8_REGS))  # [REP_PAD, D]
        else:
            pv = tl.dot(p16, v.to(dt))
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attend(q, kc_ptr, vc_ptr, base, stride_cs, start, end, kvp_ptr, kvh, qk_scale, d, kp_ptr, vp_ptr, pbase,
            r_ptr, sk_ptr, sv_ptr, sbase, HKV: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr,
            BLOCK_N: tl.constexpr, QUANT: tl.constexpr, WIDE: tl.constexpr, I8_REGS: tl.constexpr,
            BITS: tl.constexpr, ROT: tl.constexpr, SINK: tl.constexpr):
    """Rows q [REP_PAD, D] (activation dtype) over the keys start..end-1 of one cache row and kv head (base) ->
    (m, l, acc) in log2 units: m = max score, l = sum 2^(score - m), acc = sum 2^(score - m) v.
    int8 cache (x = scale * c + zp; as fp16 the codes read 1152 + c): q.k = k_scale * (q.c) + k_zp * sum(q),
    sum p v = v_scale * (p.c) + v_zp * sum(p), sum(p) being l. WIDE: a range of BLOCK_N < keys <= 2 BLOCK_N (one
    row at a long context) is read as one tile of 2 BLOCK_N keys, one dependent step instead of two. BITS: an online
    cache, its (scale, zp) per key at pbase + 2 n of kp_ptr / vp_ptr. Its transform (runtime/kv_cache.py): ROT,
    the keys and values stored as x' = (x - c) R: q R against them (c shifts every score of a row alike) and the
    output times R; SINK, keys 0..SINK-1 read from sk_ptr / sv_ptr + sbase (x' in the activation dtype, [SINK, D])
    instead of from their codes."""
    dt = q.dtype
    if ROT:
        q = _rotate_rows(q.to(tl.float32), r_ptr, D).to(dt)
    m_i = tl.full([REP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([REP_PAD], tl.float32)
    acc = tl.zeros([REP_PAD, D], tl.float32)
    qk_k = qk_scale
    bias = l_i
    if QUANT:
        k_scale, k_zp, v_scale, v_zp = _kv_params(kvp_ptr, kvh, HKV)
        if dt == tl.float16:
            k_zp -= 1152.0 * k_scale
            v_zp -= 1152.0 * v_scale
        qk_k = k_scale * qk_scale
        bias = tl.sum(q.to(tl.float32), axis=1) * (k_zp * qk_scale)  # [REP_PAD]
    qa, qb, q_sum = _code_operands(q, REP_PAD, D, BITS)
    if SINK:
        if start < tl.minimum(end, SINK):  # the sink's keys, as an fp16 cache's (none for a padding row)
            m_i, l_i, acc = _tile(q, q, q, q_sum, sk_ptr, sv_ptr, sbase, D, kp_ptr, vp_ptr, pbase, start,
                                  tl.minimum(end, SINK), d, qk_k, bias, m_i, l_i, acc, 16, D, False, False, 0)
        start = tl.maximum(start, SINK)
    if WIDE and (end - start > BLOCK_N) and (end - start <= 2 * BLOCK_N):
        m_i, l_i, acc = _tile(q, qa, qb, q_sum, kc_ptr, vc_ptr, base, stride_cs, kp_ptr, vp_ptr, pbase, start, end, d,
                              qk_k, bias, m_i, l_i, acc, 2 * BLOCK_N, D, QUANT, I8_REGS, BITS)
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _tile(q, qa, qb, q_sum, kc_ptr, vc_ptr, base, stride_cs, kp_ptr, vp_ptr, pbase, n0, end,
                                  d, qk_k, bias, m_i, l_i, acc, BLOCK_N, D, QUANT, I8_REGS, BITS)
    if QUANT:
        acc = acc * v_scale + v_zp * l_i[:, None]
    if ROT:  # as an average (within the values' range, as fp16 needs), then back to a sum
        w = tl.maximum(l_i, 1e-30)[:, None]
        acc = _rotate_rows(acc / w, r_ptr, D) * w
    return m_i, l_i, acc


@triton.jit
def _split_size(length, NS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per split for a row of ``length`` keys (ceil(length / NS) rounded up to BLOCK_N), and how many
    splits hold keys (0 for a padding row): every kernel of a step must cut the keys the same way."""
    chunk = tl.cdiv(tl.cdiv(length, NS), BLOCK_N) * BLOCK_N
    return chunk, tl.cdiv(length, tl.maximum(chunk, 1))


@triton.jit
def _attn_split_kernel(q_ptr, stride_qt, pos_ptr, slot_ptr, kc_ptr, vc_ptr, stride_cb, stride_ch, stride_cs, kvp_ptr,
                       kp_ptr, vp_ptr, stride_pb, stride_ph, r_ptr, c_ptr, sk_ptr, sv_ptr, stride_sb, stride_sh,
                       m_ptr, l_ptr, o_ptr, qk_scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr,
                       QUANT: tl.constexpr, WIDE: tl.constexpr, I8_REGS: tl.constexpr, BITS: tl.constexpr,
                       ROT: tl.constexpr, CENTER: tl.constexpr, SINK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.maximum(tl.load(pos_ptr + b) + 1, 0)
    chunk, _ = _split_size(length, NS, BLOCK_N)
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    r = tl.arange(0, REP_PAD)
    r_ok = r < REP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qt + (kvh * REP + r)[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    base = slot * stride_cb + kvh * stride_ch
    m_i, l_i, acc = _attend(q, kc_ptr, vc_ptr, base, stride_cs, start, end, kvp_ptr, kvh, qk_scale, d, kp_ptr, vp_ptr,
                            slot * stride_pb + kvh * stride_ph, r_ptr, sk_ptr, sv_ptr,
                            slot * stride_sb + kvh * stride_sh, HKV, REP_PAD, D, BLOCK_N, QUANT, WIDE, I8_REGS, BITS,
                            ROT, SINK)
    idx = (b * HQ + kvh * REP + r) * NS + s  # [REP_PAD] into [B, HQ, NS]
    tl.store(m_ptr + idx, m_i, mask=r_ok)
    tl.store(l_ptr + idx, l_i, mask=r_ok)
    tl.store(o_ptr + idx[:, None] * D + d[None, :], acc, mask=r_ok[:, None])


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, o_ptr, out_ptr, stride_ot, pos_ptr, acc_ptr, stride_at, HQ: tl.constexpr,
                         HKV: tl.constexpr, D: tl.constexpr, NS: tl.constexpr, BLOCK_N: tl.constexpr,
                         ZERO: tl.constexpr, PDL: tl.constexpr):
    """Merges the splits that hold keys (the fused kernel writes no partials for the others). ZERO: the fused
    kernel read q|k|v from split-K sums (acc [B, (HQ + 2 HKV) * D] fp32); every split is done with them now,
    so program (b, h) zeroes row b's q head h and, for h < HKV, its k and v heads h, for the next layer's sums."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b, h = tl.program_id(0), tl.program_id(1)
    if ZERO:
        zero = tl.zeros([D], tl.float32)
        arow = acc_ptr + b * stride_at + tl.arange(0, D)
        tl.store(arow + h * D, zero)
        if h < HKV:
            tl.store(arow + (HQ + h) * D, zero)
            tl.store(arow + (HQ + HKV + h) * D, zero)
    length = tl.maximum(tl.load(pos_ptr + b) + 1, 0)
    _, active = _split_size(length, NS, BLOCK_N)
    base = (b * HQ + h) * NS
    sidx = tl.arange(0, NS)
    ok = sidx < active
    d = tl.arange(0, D)
    m = tl.load(m_ptr + base + sidx, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + base + sidx, mask=ok, other=0.0)
    big = tl.max(m, axis=0)
    big = tl.where(big > float("-inf"), big, 0.0)
    w = tl.where(m > float("-inf"), tl.exp2(m - big), 0.0)  # empty splits (and padding rows) weigh 0
    acc = tl.load(o_ptr + (base + sidx)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [NS, D]
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * l, axis=0)
    out = tl.where(den > 0, num / den, 0.0)
    tl.store(out_ptr + b * stride_ot + h * D + d, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
SPLIT_CAP = 64  # at most this many splits per (row, kv head): at long contexts fewer, longer splits cost more
# than merging 64 partials


def num_splits(rows: int, kv_heads: int, max_len: int, block_n: int = 64, sms: int = 132, cap: int | None = None) -> int:
    """Splits per (row, kv head): a power of two giving about two programs per SM, at most one per
    BLOCK_N keys of the longest context and at most ``cap`` (default SPLIT_CAP)."""
    cap = cap or SPLIT_CAP
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
                     block_n: int = 64, num_warps: int = 4, num_stages: int = 2, wide: bool = False,
                     int8_in_registers: bool = False,
                     token_params: tuple[torch.Tensor, torch.Tensor] | None = None,
                     kv_transform: tuple | None = None) -> torch.Tensor:
    """q: [B, >= Hq * D] rows (heads side by side, e.g. the q part of qkv); pos, slot: [B] (the row's new
    position, whose K/V is already in the cache, and its cache row); caches [rows, Hkv, S, D] (int8 with
    kv_params [4, Hkv]; or online: uint8 codes [rows, Hkv, S, D * bits / 8] with token_params, (k, v) params
    [rows, Hkv, S, 2] float16); out: [B, Hq * D] = softmax(q k^T / sqrt(D)) v over positions 0..pos. ``wide``: a
    split of block_n < keys <= 2 block_n is read as one tile of 2 block_n keys. ``int8_in_registers``: int8 tiles
    become fp16 where they were loaded (see _int8_as). ``kv_transform``: an online cache's (rot, k centers, sink
    buffers), kv_codes.transform_args."""
    B = q.shape[0]
    hkv, D, rep, quant, bits, ns, (m, l, acc) = _checked(B, pos, slot, k_cache, v_cache, num_heads, out, kv_params,
                                                         scratch, splits, block_n, token_params)
    assert q.stride(-1) == 1 and q.shape[1] >= num_heads * D
    targs, tconst = checked_transform(bits, kv_transform, m, hkv, D)
    if B == 0:
        return out
    on = pdl(q)
    _attn_split_kernel[(B, hkv, ns)](
        q, q.stride(0), pos, slot, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        kv_params if quant else m, *param_args(token_params, m), *targs, m, l, acc, LOG2E / math.sqrt(D),
        HQ=num_heads, HKV=hkv, D=D, REP=rep, REP_PAD=max(16, triton.next_power_of_2(rep)), BLOCK_N=block_n, NS=ns,
        QUANT=quant, WIDE=wide, I8_REGS=int8_in_registers, BITS=bits, **tconst, PDL=on, num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=on)
    _combine(m, l, acc, out, pos, num_heads, ns, block_n, on)
    return out


def _checked(B: int, pos, slot, k_cache, v_cache, num_heads: int, out, kv_params, scratch, splits, block_n: int,
             token_params=None):
    """The checks both decode-attention entry points make -> (Hkv, D, rep, quantized, online bits (0: none),
    splits, (m, l, acc))."""
    hkv, D = k_cache.shape[1], out.shape[-1] // num_heads
    assert num_heads % hkv == 0
    bits = online_bits(k_cache, D, token_params)
    assert pos.shape == slot.shape == (B,) and pos.is_contiguous() and slot.is_contiguous()
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert D >= 16 and D & (D - 1) == 0, f"head_dim {D}: a power of two >= 16"
    assert out.shape == (B, num_heads * D) and out.stride(-1) == 1
    quant = k_cache.dtype == torch.int8
    assert not quant or (kv_params is not None and kv_params.shape == (4, hkv) and kv_params.dtype == torch.float32)
    ns = splits or num_splits(B, hkv, k_cache.shape[2], block_n)
    assert ns & (ns - 1) == 0, f"splits {ns}: a power of two"
    m, l, acc = scratch if scratch is not None else partials(B, num_heads, ns, D, out.device)
    assert m.shape[0] >= B and m.shape[1:] == (num_heads, ns) and acc.shape[1:] == (num_heads, ns, D)
    return hkv, D, num_heads // hkv, quant, bits, ns, (m, l, acc)


def checked_transform(bits: int, kv_transform, dummy: torch.Tensor, hkv: int, D: int) -> tuple[tuple, dict]:
    """kv_codes.transform_args for an online cache (bits 8 or 4) with at most 16 sink positions."""
    assert bits or kv_transform is None, "a KV transform needs an online cache"
    targs, tconst = transform_args(kv_transform, dummy, hkv, D)
    assert tconst["SINK"] <= 16, f"a sink of {tconst['SINK']} positions: at most 16"
    return targs, tconst


def _combine(m, l, acc, out, pos, num_heads: int, ns: int, block_n: int, on: bool, sums: torch.Tensor | None = None,
             hkv: int = 1) -> None:
    """The merge of the splits' partials into out, one program per (row, query head); ``sums``: the split-K qkv
    sums the splits read, zeroed here (after every split is done with them)."""
    _attn_combine_kernel[(out.shape[0], num_heads)](
        m, l, acc, out, out.stride(0), pos, sums if sums is not None else m, sums.stride(0) if sums is not None else 0,
        HQ=num_heads, HKV=hkv, D=acc.shape[-1], NS=ns, BLOCK_N=block_n, ZERO=sums is not None, PDL=on, num_warps=2,
        launch_pdl=on)
