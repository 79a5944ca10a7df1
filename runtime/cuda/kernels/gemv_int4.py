"""int4 weights times a few rows (decode), and the whole weight dequantized (prefill).

Device layout of the codes ("words", built once at load by convert/layout.pack_words from the workspace's
uint8 codes): int32 [N, K/8], stored group-major [K/G, N, G/8] by the runtime (convert/layout.group_major: one
group of all rows contiguous; every kernel takes either layout through its row and group strides); word w
(0 .. WG-1, WG = G/8) of group g of a row holds in bits 4i .. 4i+3 the code of column g*G + i*WG + w. So the columns of one nibble position i are contiguous (x for them is one
vector load), and ``(word & 0xF << 4i) | (150 - 4i) << 23`` is exactly the float 2^(23-4i) + q: one LOP3,
then a constant subtraction, with no int-to-float conversion (I2F issues at a fraction of the FMA rate and
bounds a kernel that converts every code). scales fp16 [N, K/G], zeros uint8 [N, K/G]; w = (q - z) * s.

  _w4_gemv_kernel  ROWS input rows per program (default one), CUDA cores: each step's codes are made once
         for them (more rows than that: more programs, the weights re-read from L2). Tile [C, BLOCK_N, V]:
         C = 32 * num_warps thread-columns of V consecutive words (one 4V-byte load per row), all BLOCK_N
         rows in each thread's registers, so x is loaded and prepared once per thread. Per group and row:
             sum_k (q - z) s h = s * (sum_k q h - z sum_k h).
         The next step's words, scales and zeros load before this step's arithmetic; with PDL the first
         step's load precedes the wait for the previous kernel (weights are never written).
  _w4_gemm_kernel  BLOCK_M (>= 16) rows per program through tl.dot (a group's words unpack to [BLOCK_N, G]
         in column order); also used for a single row, padded
  _w4_tc_kernel    the weights as the left tensor-core operand (Hopper's wgmma takes them from registers at
         BLOCK_N >= 64): one LOP3 makes two fp16 1024 + q of a word's nibbles a and a+4, x is loaded in that
         (bit-reversed nibble) column order, and up to BLOCK_M rows share one pass over the weights
Fused around y = h W^T:
  prologue  none:      h = x                                               x: [M, K] activations
            rmsnorm:   h = x * rsqrt(mean(x^2) + eps) * norm_w             x: the fp32 residual [M, K]
            silu:      h = silu(x[:, 2k]) * x[:, 2k+1]    x: w13's fp32 sums [M, 2K] (mma kernel; else a kernel first)
  epilogue  store:     out = y + bias                  (SPLIT_K must be 1: one program owns an output)
            residual:  out += y   (out: the fp32 residual [M, N]; atomic adds when SPLIT_K > 1)
            silu:      out[:, n] = silu(y[:, 2n]) * y[:, 2n+1]  (w13 with gate/up rows interleaved in pairs,
                       convert/layout.interleave_pairs; SPLIT_K must be 1)
h is rounded to the activation dtype where the dense model rounds (runtime/cpu/model.py), except in _gemv
with one K-slice: there RMSNorm is applied as  y = rstd * (x * norm_w) W^T  in fp32 (rstd is a per-row
scalar), so sum(x^2) accumulates in the main loop and no pass over x precedes the weight loads.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import INTERPRET, pdl, rounding
from .attention import _last_to_arrive
from .norm import silu_mul
from .tuning import GemvConfig, misfit, rule
from ....convert.layout import word_strides

try:  # Gluon (Triton 3.4 - 3.6): the mma.sync kernel; without it, or where its experimental API has moved (an
    # attribute or signature its module-level layouts and jits rely on), the tensor-core kernel takes its configs
    from . import mma_int4
    HAVE_MMA = True
except (ImportError, AttributeError, TypeError):
    HAVE_MMA = False

PROLOGUES = {"none": 0, "rmsnorm": 1, "silu": 2}
EPILOGUES = {"store": 0, "residual": 1, "silu": 2}


_act = triton.jit(rounding.act)
_silu_mul = triton.jit(rounding.silu_mul)


@triton.jit
def _input(x_rows, k, mask, K, rstd, nw_ptr, PRO: tl.constexpr, ACT_BF16: tl.constexpr):
    """h at columns k of rows x_rows (pointers, broadcast against k), fp32."""
    if PRO == 1:
        v = tl.load(x_rows + k, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + k, mask=mask, other=0.0).to(tl.float32)
        h = _act(_act(v * rstd, ACT_BF16) * w, ACT_BF16)        # weight * (x * rstd).to(dtype)
    else:
        h = tl.load(x_rows + k, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _codes(words, i: tl.constexpr, ASM: tl.constexpr):
    """Nibble i of int32 words as exact float32 codes: (w & 0xF << 4i) | (150 - 4i) << 23 is 2^(23-4i) + q
    (i >= 5: from w >> 20, whose nibble i-5 is the same code). One LOP3 through inline PTX (Triton's own
    and/or compile to two); the interpreter takes the plain expression."""
    if i < 5:
        src = words
        SH: tl.constexpr = 4 * i
    else:
        src = words >> 20
        SH: tl.constexpr = 4 * i - 20
    MASK: tl.constexpr = 0xF << SH
    MAGIC: tl.constexpr = (150 - SH) << 23
    if ASM:
        f = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {MASK}, {MAGIC}, 0xea;", "=r,r", [src], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        f = ((src & MASK) | MAGIC).to(tl.float32, bitcast=True)
    return f - (1 << (23 - SH))


@triton.jit
def _words_group(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn, n_ok, g, G: tl.constexpr):
    """Group g of rows rn: words int32 [BLOCK_N, G/8], scales fp16 and zeros uint8 [BLOCK_N]."""
    WG: tl.constexpr = G // 8
    w = tl.load(w_ptr + rn[:, None] * stride_w + g * stride_g + tl.arange(0, WG)[None, :], mask=n_ok[:, None],
                other=0)
    s = tl.load(s_ptr + rn * stride_s + g, mask=n_ok, other=0.0)
    z = tl.load(z_ptr + rn * stride_s + g, mask=n_ok, other=0)
    return w, s, z


@triton.jit
def _f16_1024(v):
    """Integers 0 <= v < 1024 as fp16 1024 + v, exactly: the bits 0x6400 | v (no int-to-float conversion)."""
    return (v.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def _nibbles(w, i: tl.constexpr):
    """Codes of nibble i of words [R, WG] as float32 [R, WG]: columns i * WG + (0 .. WG-1) of the group."""
    return ((w >> (4 * i)) & 0xF).to(tl.float32)


@triton.jit
def _group_codes(w):
    """Words [R, WG] of one group -> codes [R, G] int32 in column order (column i * WG + w = nibble i of
    word w). Built by joins, then one permute."""
    R: tl.constexpr = w.shape[0]
    WG: tl.constexpr = w.shape[1]
    a0 = w & 0xF
    a1 = (w >> 4) & 0xF
    a2 = (w >> 8) & 0xF
    a3 = (w >> 12) & 0xF
    a4 = (w >> 16) & 0xF
    a5 = (w >> 20) & 0xF
    a6 = (w >> 24) & 0xF
    a7 = (w >> 28) & 0xF
    q = tl.join(tl.join(tl.join(a0, a1), tl.join(a2, a3)), tl.join(tl.join(a4, a5), tl.join(a6, a7)))
    # join stacks on a new last dim: q[r, w, c, d, e] = a[c + 2d + 4e]; order (e, d, c, w) is column order
    q = tl.permute(q, [0, 4, 3, 2, 1])
    return tl.reshape(q, [R, WG * 8])


@triton.jit
def _slice(K, SPLIT_K, pid_k, G: tl.constexpr):
    """The groups of K-slice pid_k: g_lo .. g_hi-1."""
    per = tl.cdiv(K // G, SPLIT_K)
    g_lo = pid_k * per
    return g_lo, tl.minimum(g_lo + per, K // G)


@triton.jit
def _rstd(x_rows, mask, K, eps, ROWS: tl.constexpr, K_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of rows x_rows ([ROWS, 1] pointers, mask [ROWS, 1]) -> [ROWS, 1]. The chunks
    are unrolled and summed elementwise, so their loads can all be in flight; one reduction at the end."""
    ss = tl.zeros([ROWS, CHUNK], tl.float32)
    for c in tl.static_range(K_POW2 // CHUNK):
        k = c * CHUNK + tl.arange(0, CHUNK)[None, :]
        v = tl.load(x_rows + k, mask=mask & (k < K), other=0.0).to(tl.float32)
        ss += v * v
    return 1.0 / tl.sqrt(tl.sum(ss, axis=1, keep_dims=True) / K + eps)


@triton.jit
def _epilogue(acc, y_ptr, stride_ym, rm, m_ok, b_ptr, rn, n_ok, pid_k, EPI: tl.constexpr, ATOMIC: tl.constexpr,
              HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr):
    """acc [R, BLOCK_N] (+ bias, from the first K-slice) for rows rm [R] and outputs rn [BLOCK_N]: stored,
    added to the fp32 residual, or (silu) out[:, n] = silu(acc[:, 2n]) * acc[:, 2n+1] at n = rn // 2."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if EPI == 0:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    elif EPI == 1:
        if ATOMIC:
            tl.atomic_add(y, acc, mask=mask)
        else:
            tl.store(y, tl.load(y, mask=mask, other=0.0) + acc, mask=mask)
    else:
        R: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        gate, up = tl.split(tl.reshape(acc, [R, BN // 2, 2]))
        h = _silu_mul(gate, up, ACT_BF16)
        hn = tl.max(tl.reshape(rn, [BN // 2, 2]), axis=1) // 2  # output column of each pair
        h_ok = tl.max(tl.reshape(n_ok.to(tl.int32), [BN // 2, 2]), axis=1) > 0
        tl.store(y_ptr + rm[:, None] * stride_ym + hn[None, :], h.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & h_ok[None, :])


@triton.jit
def _w4_gemv_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, b_ptr, y_ptr,
                    stride_ym, M, N, K, SPLIT_K, G: tl.constexpr, PRO: tl.constexpr, EPI: tl.constexpr, ATOMIC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, ROWS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Rows ROWS * program_id(2) .. + ROWS - 1; C = 32 * num_warps. The codes of a step are made once for the
    ROWS rows. With PRO == 1 (SPLIT_K == 1): y = rstd * (x * norm_w) W^T, sum(x^2) in the loop."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    WG: tl.constexpr = G // 8            # words per group
    TPG: tl.constexpr = WG // V          # thread-columns per group
    GPS: tl.constexpr = C // TPG         # groups per step
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = pid_m * ROWS + tl.arange(0, ROWS)
    m_ok = rm < M
    c = tl.arange(0, C)
    v = tl.arange(0, V)
    g_lo, g_hi = _slice(K, SPLIT_K, pid_k, G)
    x_rows = (x_ptr + rm * stride_xm)[:, None, None, None]                # [R, 1, 1, 1]
    x_ok = m_ok[:, None, None, None]
    wcol = ((c % TPG) * V)[:, None, None] + v[None, None, :]           # word within its group [C, 1, V]
    w_rows = w_ptr + rn[None, :, None] * stride_w + wcol                # [C, BN, V]
    s_rows = rn[None, :] * stride_s                                     # [1, BN]
    # the first step's weights do not depend on the previous kernel: load them before waiting for it
    g = g_lo + c // TPG
    c_ok = g < g_hi
    w = tl.load(w_rows + (g * stride_g)[:, None, None], mask=c_ok[:, None, None] & n_ok[None, :, None], other=0)
    sc = tl.load(s_ptr + s_rows + g[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
    zp = tl.load(z_ptr + s_rows + g[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([ROWS, C, BLOCK_N], tl.float32)
    sq = tl.zeros([ROWS, C, 1, V], tl.float32)
    for g0 in range(g_lo, g_hi, GPS):
        gn = g + GPS                                                    # the next step's weights, loading now
        gn_ok = gn < g_hi
        w_n = tl.load(w_rows + (gn * stride_g)[:, None, None], mask=gn_ok[:, None, None] & n_ok[None, :, None],
                      other=0)
        sc_n = tl.load(s_ptr + s_rows + gn[:, None], mask=gn_ok[:, None] & n_ok[None, :], other=0.0)
        zp_n = tl.load(z_ptr + s_rows + gn[:, None], mask=gn_ok[:, None] & n_ok[None, :], other=0)
        p = tl.zeros([ROWS, C, BLOCK_N, V], tl.float32)
        xs = tl.zeros([ROWS, C, 1, V], tl.float32)
        for i in tl.static_range(8):
            col = (g * G)[:, None, None] + i * WG + wcol
            xi = tl.load(x_rows + col[None], mask=x_ok & c_ok[None, :, None, None], other=0.0).to(tl.float32)
            if PRO == 1:  # h = x * norm_w now, times rstd at the end
                sq += xi * xi
                xi = xi * tl.load(nw_ptr + col, mask=c_ok[:, None, None], other=0.0).to(tl.float32)[None]
            xs += xi
            p += _codes(w, i, ASM)[None] * xi
        acc += sc.to(tl.float32)[None] * (tl.sum(p, axis=3) - zp.to(tl.float32)[None] * tl.sum(xs, axis=3))
        w, sc, zp, g, c_ok = w_n, sc_n, zp_n, gn, gn_ok
    out = tl.sum(acc, axis=1)                                           # [R, BN]
    if PRO == 1:
        out = out / tl.sqrt(tl.sum(tl.sum(tl.sum(sq, axis=3), axis=2), axis=1) / K + eps)[:, None]
    _epilogue(out, y_ptr, stride_ym, rm, m_ok, b_ptr, rn, n_ok, pid_k, EPI, ATOMIC, HAS_BIAS, ACT_BF16)


@triton.jit
def _tile(x_ptr, stride_xm, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (n block, K-slice, m block)'s outputs rn [BN] and rows rm [BM] with their masks, and the rows'
    x pointers [BM, 1]."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rn, rn < N, rm, rm < M, x_ptr + rm[:, None] * stride_xm


@triton.jit
def _w4_gemm_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, b_ptr, y_ptr,
                    stride_ym, M, N, K, SPLIT_K, G: tl.constexpr, PRO: tl.constexpr, EPI: tl.constexpr,
                    ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, K_POW2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_k = tl.program_id(1)
    rn, n_ok, rm, m_ok, x_rows = _tile(x_ptr, stride_xm, M, N, BLOCK_M, BLOCK_N)
    rstd = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    if PRO == 1:  # first: h is rounded to fp16 / bf16 for tl.dot, so it must be normalized before
        rstd = _rstd(x_rows, m_ok[:, None], K, eps, BLOCK_M, K_POW2, CHUNK)
    g_lo, g_hi = _slice(K, SPLIT_K, pid_k, G)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(g_lo, g_hi):
        w, s, z = _words_group(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn, n_ok, g, G)
        q = _group_codes(w)                                         # [BN, G]
        x = _input(x_rows, (g * G + tl.arange(0, G))[None, :], m_ok[:, None], K, rstd, nw_ptr, PRO, ACT_BF16)
        if ACT_BF16:  # w = (q - z) * s, rounded once
            wd = ((q.to(tl.float32) - z.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]).to(tl.bfloat16)
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(wd))
        else:  # q | 0x6400 read as fp16 is 1024 + q (no int-to-float conversion); the difference q - z is
            # exact in fp16 and s is fp16: one rounding, as in fp32
            qh = _f16_1024(q)
            zh = _f16_1024(z)
            wd = (qh - zh[:, None]) * s[:, None]
            acc += tl.dot(x.to(tl.float16), tl.trans(wd))
    _epilogue(acc, y_ptr, stride_ym, rm, m_ok, b_ptr, rn, n_ok, pid_k, EPI, ATOMIC, HAS_BIAS, ACT_BF16)


@triton.jit
def _half(w, i: tl.constexpr):
    """Nibble i of words as fp16 1024 + q."""
    return _f16_1024((w >> (4 * i)) & 0xF)


@triton.jit
def _halves(w, ASM: tl.constexpr):
    """Words [R, WG] -> fp16 1024 + q [R, WG * 8], element w * 8 + p holding nibble REV(p) (p's three bits
    reversed) of word w (_tc_cols gives its column). Per word four LOP3 and three shifts, no conversion:
    (w >> 4a) & 0x000F000F | 0x64006400 is the pair of fp16 1024 + q for nibbles a and a + 4, and the pair
    lands on adjacent elements (tl.join stacks on a new last axis, so the flattened joins reverse the bits)."""
    R: tl.constexpr = w.shape[0]
    WG: tl.constexpr = w.shape[1]
    if ASM:
        h = tl.inline_asm_elementwise(
            "{ .reg .b32 t, s;\n"
            "lop3.b32 t, $8, 0x000F000F, 0x64006400, 0xea; mov.b32 {$0, $4}, t;\n"
            "shr.u32 s, $8, 4; lop3.b32 t, s, 0x000F000F, 0x64006400, 0xea; mov.b32 {$1, $5}, t;\n"
            "shr.u32 s, $8, 8; lop3.b32 t, s, 0x000F000F, 0x64006400, 0xea; mov.b32 {$2, $6}, t;\n"
            "shr.u32 s, $8, 12; lop3.b32 t, s, 0x000F000F, 0x64006400, 0xea; mov.b32 {$3, $7}, t; }",
            "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        h = (_half(w, 0), _half(w, 1), _half(w, 2), _half(w, 3), _half(w, 4), _half(w, 5), _half(w, 6), _half(w, 7))
    q = tl.join(tl.join(tl.join(h[0], h[1]), tl.join(h[2], h[3])), tl.join(tl.join(h[4], h[5]), tl.join(h[6], h[7])))
    return tl.reshape(q, [R, WG * 8])  # q[r, w, c, d, e] = h[c + 2d + 4e] sits at flat w * 8 + 4c + 2d + e


@triton.jit
def _tc_cols(GPI: tl.constexpr, G: tl.constexpr):
    """Column, from the first group's, of _halves' element j over GPI groups: the group j // G, then within it
    REV(j % 8) * WG + (j // 8) % WG."""
    j = tl.arange(0, GPI * G)
    p = j % 8
    return (j // G) * G + (((p & 1) << 2) | (p & 2) | (p >> 2)) * (G // 8) + (j // 8) % (G // 8)


@triton.jit
def _tc_weights(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn,
                                n_ok, g, g_hi, GPI: tl.constexpr,
                G: tl.constexpr):
    """Groups g .. g+GPI-1 (those < g_hi) of rows rn: words [BN, GPI*WG], scales and zeros [BN, GPI]."""
    WG: tl.constexpr = G // 8
    wi = tl.arange(0, GPI * WG)
    w = tl.load(w_ptr + rn[:, None] * stride_w + ((g + wi // WG) * stride_g + wi % WG)[None, :],
                mask=n_ok[:, None] & (g + wi // WG < g_hi)[None, :], other=0)
    gi = g + tl.arange(0, GPI)
    ok = n_ok[:, None] & (gi < g_hi)[None, :]
    s = tl.load(s_ptr + rn[:, None] * stride_s + gi[None, :], mask=ok, other=0.0)
    z = tl.load(z_ptr + rn[:, None] * stride_s + gi[None, :], mask=ok, other=0)
    return w, s, z


@triton.jit
def _tc_x(x_rows, m_ok, nw_ptr, g, g_hi, PRO: tl.constexpr, GPI: tl.constexpr, G: tl.constexpr, XVEC: tl.constexpr):
    """x [BM, GPI*G] of groups g .. g+GPI-1 in _halves' order (fp32; 0 past g_hi), and with the RMSNorm prologue
    its weight [1, GPI*G] (else zeros). XVEC: loaded in column order, contiguous along each nibble's WG
    columns, then reordered in registers; else gathered element by element."""
    WG: tl.constexpr = G // 8
    BM: tl.constexpr = x_rows.shape[0]
    k = g * G + _tc_cols(GPI, G)[None, :]
    if XVEC:  # [BM, GPI, nibble bit 2, bit 1, bit 0, WG] -> [BM, GPI, WG, bit 0, bit 1, bit 2] = _halves' order
        k6 = (tl.arange(0, GPI)[:, None, None, None, None] * G + tl.arange(0, 2)[None, :, None, None, None] * 4 * WG
              + tl.arange(0, 2)[None, None, :, None, None] * 2 * WG + tl.arange(0, 2)[None, None, None, :, None] * WG
              + tl.arange(0, WG)[None, None, None, None, :])
        ok6 = (g + tl.arange(0, GPI) < g_hi)[:, None, None, None, None]
        xv = tl.load(tl.reshape(x_rows, [BM, 1, 1, 1, 1, 1]) + g * G + k6[None],
                     mask=tl.reshape(m_ok, [BM, 1, 1, 1, 1, 1]) & ok6[None], other=0.0)
        x = tl.reshape(tl.permute(xv, [0, 1, 5, 4, 3, 2]), [BM, GPI * G])
    else:
        j = tl.arange(0, GPI * G)[None, :]
        x = tl.load(x_rows + k, mask=m_ok & (g + j // G < g_hi), other=0.0)
    nw = tl.zeros([1, GPI * G], tl.float32)
    if PRO == 1:
        nw = tl.load(nw_ptr + k, mask=k < g_hi * G, other=0.0).to(tl.float32)
    return x.to(tl.float32), nw


@triton.jit
def _w4_tc_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, b_ptr, y_ptr,
                  stride_ym, M, N, K, SPLIT_K, G: tl.constexpr, PRO: tl.constexpr, EPI: tl.constexpr, ATOMIC: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  K_POW2: tl.constexpr, CHUNK: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
                  GPI: tl.constexpr = 1, XVEC: tl.constexpr = False, PF: tl.constexpr = 1, sa_ptr=None, stride_sa=0,
                  cnt_ptr=None, SPLIT_SILU: tl.constexpr = False, FENCE: tl.constexpr = False):
    """Tensor cores with the weights as the left operand: y^T [BLOCK_N, BLOCK_M] += W [BLOCK_N, GPI*G] x^T per
    GPI groups, W = (1024 + q - (1024 + z)) * s dequantized in registers from _halves (exact difference, one
    rounding), x in _halves' column order; the weights PF steps ahead (PF = 1, 2, 3: up to three steps' words
    in flight, a few registers each) and the next step's x load before this step's arithmetic.
    BLOCK_N >= 64 gives Hopper's wgmma with the weights from registers; the rows up to BLOCK_M share one pass
    over the weights."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_k = tl.program_id(1)
    rn, n_ok, rm, m_ok, x_rows = _tile(x_ptr, stride_xm, M, N, BLOCK_M, BLOCK_N)
    g_lo, g_hi = _slice(K, SPLIT_K, pid_k, G)
    # the first weights do not depend on the previous kernel: with PDL they load before waiting for it
    w, s, z = _tc_weights(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn,
                                n_ok, g_lo, g_hi, GPI, G)
    w1, s1, z1 = w, s, z
    w2, s2, z2 = w, s, z
    if PF >= 2:
        w1, s1, z1 = _tc_weights(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn,
                                n_ok, g_lo + GPI, g_hi, GPI, G)
    if PF >= 3:
        w2, s2, z2 = _tc_weights(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn,
                                n_ok, g_lo + 2 * GPI, g_hi, GPI, G)
    if PDL:
        tl.extra.cuda.gdc_wait()
    rstd = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    if PRO == 1:
        rstd = _rstd(x_rows, m_ok[:, None], K, eps, BLOCK_M, K_POW2, CHUNK)
    x, nw = _tc_x(x_rows, m_ok[:, None], nw_ptr, g_lo, g_hi, PRO, GPI, G, XVEC)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g in range(g_lo, g_hi, GPI):
        w_n, s_n, z_n = _tc_weights(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn,
                                n_ok, g + PF * GPI, g_hi, GPI, G)
        x_n, nw_n = _tc_x(x_rows, m_ok[:, None], nw_ptr, g + GPI, g_hi, PRO, GPI, G, XVEC)
        h = _halves(w, ASM)                                                     # [BN, GPI*G] fp16 1024 + q
        zh = _f16_1024(z)                                                       # 1024 + z  [BN, GPI]
        zh = tl.reshape(tl.broadcast_to(zh[:, :, None], [BLOCK_N, GPI, G]), [BLOCK_N, GPI * G])
        se = tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_N, GPI, G]), [BLOCK_N, GPI * G])
        if PRO == 1:
            x = _act(_act(x * rstd, ACT_BF16) * nw, ACT_BF16)
        if ACT_BF16:
            wd = ((h - zh).to(tl.float32) * se.to(tl.float32)).to(tl.bfloat16)
            acc += tl.dot(wd, tl.trans(x.to(tl.bfloat16)))
        else:
            acc += tl.dot((h - zh) * se, tl.trans(x.to(tl.float16)))
        if PF == 1:
            w, s, z = w_n, s_n, z_n
        elif PF == 2:
            w, s, z, w1, s1, z1 = w1, s1, z1, w_n, s_n, z_n
        else:
            w, s, z, w1, s1, z1, w2, s2, z2 = w1, s1, z1, w2, s2, z2, w_n, s_n, z_n
        x, nw = x_n, nw_n
    if SPLIT_SILU:
        _silu_last_slice(tl.trans(acc), sa_ptr, stride_sa, cnt_ptr, SPLIT_K, y_ptr, stride_ym, rm, m_ok, rn, n_ok,
                         ACT_BF16, FENCE)
    else:
        _epilogue(tl.trans(acc), y_ptr, stride_ym, rm, m_ok, b_ptr, rn, n_ok, pid_k, EPI, ATOMIC, HAS_BIAS, ACT_BF16)


@triton.jit
def _silu_last_slice(acc, sa_ptr, stride_sa, cnt_ptr, SPLIT_K, y_ptr, stride_ym, rm, m_ok, rn, n_ok,
                     ACT_BF16: tl.constexpr, FENCE: tl.constexpr):
    """The SiLU-mul epilogue under split-K: each K-slice adds its sums acc [R, BN] into the fp32 buffer sa; the
    last slice of the tile to finish (a counter per tile) reads the totals, stores silu(gate) * up, and leaves
    its tile of sa and its counter at zero for the next call."""
    mask = m_ok[:, None] & n_ok[None, :]
    sums = sa_ptr + rm[:, None] * stride_sa + rn[None, :]
    tl.atomic_add(sums, acc, mask=mask, sem="relaxed")
    tile = tl.program_id(0) + tl.num_programs(0) * tl.program_id(2)
    if _last_to_arrive(cnt_ptr + tile, SPLIT_K, FENCE):  # every other slice's sums are in
        total = tl.load(sums, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(sums, tl.zeros_like(total), mask=mask)
        _epilogue(total, y_ptr, stride_ym, rm, m_ok, y_ptr, rn, n_ok, 0, 2, False, False, ACT_BF16)


@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, out_ptr, stride_o, N, G: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_ok = rn < N
    w, s, z = _words_group(w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, rn, n_ok, g, G)
    for i in tl.static_range(8):
        wd = (_nibbles(w, i) - z.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]  # [BN, G/8]
        kk = g * G + i * (G // 8) + tl.arange(0, G // 8)
        tl.store(out_ptr + rn[:, None] * stride_o + kk[None, :], wd.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


# ----------------------------------------------------------------------------------------------
def mma_runs(x: torch.Tensor, group: int) -> bool:
    """Whether kernels/mma_int4.py can run for x's device and this group size."""
    return (HAVE_MMA and not INTERPRET and x.device.type == "cuda" and group == 128
            and torch.cuda.get_device_capability(x.device)[0] >= 8)


def mma_fallback(cfg: GemvConfig) -> GemvConfig:
    """The tensor-core kernel in place of an mma config that cannot run here: 128 outputs and 8 warps (64 and 4
    for smaller mma tiles), the same split-K."""
    wide = cfg.block_n >= 128
    return replace(cfg, mma=False, tc=True, dot=True, block_n=128 if wide else 64, num_warps=8 if wide else 4,
                   xvec=True)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def w4_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
              out: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, epilogue: str = "store",
              config: GemvConfig | None = None, sums: tuple[torch.Tensor, torch.Tensor] | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """out = h(x) W^T (+ bias); out += h(x) W^T (``epilogue="residual"``, out fp32); or out = silu(y[:, 0::2]) *
    y[:, 1::2] of y = h(x) W^T (``"silu"``: the pair-interleaved w13, out [M, N/2]). x: [M, K]; words: int32
    [N, K/8] (convert/layout.pack_words). h = x, RMSNorm(x) (``prologue="rmsnorm"``), or (``"silu"``) silu(x[:,
    0::2]) * x[:, 1::2] of w13's fp32 sums x [M, 2 K], in the activation ``dtype`` (inside the mma kernel; a
    silu_mul kernel first for the others). ``"silu"`` with split-K (the tensor-core kernels only) adds the
    slices' sums into ``sums`` = (fp32 [>= M, N], int32 counters [>= one per tile]), both zero, and leaves them
    zero (sum_buffers makes them; without, this call makes its own)."""
    N, K, stride_w, stride_g = word_strides(words, group)
    M = x.shape[0]
    pro, epi = PROLOGUES[prologue], EPILOGUES[epilogue]
    if pro == 2:
        assert x.dim() == 2 and x.dtype == torch.float32 and x.shape[1] == 2 * K and x.stride(-1) == 1, \
            f"silu prologue: x is w13's fp32 sums [M, {2 * K}], got {tuple(x.shape)} {x.dtype}"
        assert dtype in (torch.float16, torch.bfloat16), "silu prologue: give the activation dtype"
        cfg = config or rule(M, N, K, group, epilogue)
        if not (cfg.mma and mma_runs(x, group)):  # only the mma kernel applies it itself
            h = silu_mul(x, torch.empty(M, K, device=x.device, dtype=dtype), pairs=True)
            return w4_matmul(h, words, scales, zeros, group, out, bias, epilogue=epilogue, config=config, sums=sums)
    assert scales.shape == zeros.shape == (N, K // group) and scales.stride() == zeros.stride() and scales.stride(-1) == 1
    assert zeros.dtype == torch.uint8, "zeros: uint8 [N, K/G]"
    assert group >= 32 and group & (group - 1) == 0 and K % group == 0, f"group {group}: a power of two >= 32 dividing K"
    assert pro == 2 or (x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] == K), f"x {tuple(x.shape)}, K={K}"
    n_out = N // 2 if epi == 2 else N
    assert out.dim() == 2 and out.shape == (M, n_out) and out.stride(-1) == 1, f"out {tuple(out.shape)} for [{M}, {n_out}]"
    assert epi != 1 or out.dtype == torch.float32, "the residual is float32"
    assert epi != 2 or (N % 2 == 0 and bias is None), "silu: gate/up pairs, no bias"
    assert pro != 1 or (norm_weight is not None and norm_weight.shape == (K,) and norm_weight.is_contiguous())
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous())
    act = dtype if pro == 2 else (out.dtype if epi != 1 else (x.dtype if pro != 1 else norm_weight.dtype))
    assert act in (torch.float16, torch.bfloat16), f"activations must be fp16 or bf16, got {act}"
    cfg = config or rule(M, N, K, group, epilogue, prologue)
    if cfg.mma and not mma_runs(x, group):
        cfg = mma_fallback(cfg)
    why = misfit(cfg, group, epilogue, prologue)
    assert why is None, why
    split_silu = epi == 2 and cfg.split_k > 1
    nw = norm_weight if norm_weight is not None else scales  # unused pointer when the prologue has no norm
    b = bias if bias is not None else scales
    on = pdl(x)
    common = dict(G=group, PRO=pro, EPI=epi, ATOMIC=cfg.split_k > 1, HAS_BIAS=bias is not None,
                  ACT_BF16=act == torch.bfloat16, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, PDL=on, launch_pdl=on)
    if cfg.maxnreg is not None:
        common["maxnreg"] = cfg.maxnreg
    n_blocks = triton.cdiv(N, cfg.block_n)
    if split_silu:  # a counter per tile of block_n outputs and 8 rows (the mma kernel's; the others take 16)
        sums = sums if sums is not None else sum_buffers(M, N, x.device)
        acc, cnt = sums
        assert acc.dtype == torch.float32 and acc.shape[0] >= M and acc.shape[1] == N and acc.stride(-1) == 1
        assert cnt.dtype == torch.int32 and cnt.numel() >= n_blocks * triton.cdiv(M, 8), "one counter per tile"
    if cfg.mma:
        mma_int4.launch(x, words, scales, zeros, group, out, bias, epi, cfg.split_k, cfg.num_warps, cfg.block_n,
                        act == torch.bfloat16, on, sums if split_silu else None,
                        norm_weight if pro == 1 else None, eps, cfg.pf, silu_x=pro == 2)
        return out
    weights = (words, scales, zeros, stride_w, stride_g, scales.stride(0))
    if not (cfg.dot or cfg.tc):  # a program per ``rows`` rows and block of outputs (more rows re-read the weights)
        _w4_gemv_kernel[(n_blocks, cfg.split_k, triton.cdiv(M, cfg.rows))](
            x, x.stride(0), nw, eps, *weights, b, out, out.stride(0), M, N, K, cfg.split_k, V=cfg.v,
            C=32 * cfg.num_warps, ROWS=cfg.rows, ASM=not INTERPRET, **common)
        return out
    # the tl.dot kernels: BLOCK_M rows per program; the RMSNorm pass takes [BLOCK_M, CHUNK] elements at a time
    # (32 per thread with 4 warps)
    block_m = min(64, max(16, _pow2_at_least(M)))
    k_pow2 = triton.next_power_of_2(K)
    grid = (n_blocks, cfg.split_k, triton.cdiv(M, block_m))
    args = (x, x.stride(0), nw, eps, *weights, b, out, out.stride(0), M, N, K, cfg.split_k)
    tiles = dict(BLOCK_M=block_m, K_POW2=k_pow2, CHUNK=min(k_pow2, 4096 // block_m))
    if cfg.tc:
        extra = {}
        if split_silu:
            extra = dict(sa_ptr=acc, stride_sa=acc.stride(0), cnt_ptr=cnt, SPLIT_SILU=True, FENCE=not INTERPRET)
        _w4_tc_kernel[grid](*args, **tiles, ASM=not INTERPRET, GPI=cfg.gpi, XVEC=cfg.xvec, PF=cfg.pf, **extra,
                            **common)
    else:
        _w4_gemm_kernel[grid](*args, **tiles, **common)
    return out


def sum_buffers(rows: int, n: int, device, min_block_n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed buffers of w4_matmul's SiLU-mul epilogue under split-K: fp32 sums [rows, n] and a counter per
    tile of >= min_block_n outputs and 8 rows."""
    tiles = -(-n // min_block_n) * -(-rows // 8)
    return (torch.zeros(rows, n, device=device, dtype=torch.float32),
            torch.zeros(tiles, device=device, dtype=torch.int32))


def w4_dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  out: torch.Tensor) -> torch.Tensor:
    """out [N, K] = (q - z) * s in out's dtype (prefill: then a dense matmul)."""
    N, K, stride_w, stride_g = word_strides(words, group)
    assert scales.stride() == zeros.stride()
    assert group >= 32 and group & (group - 1) == 0 and K % group == 0, f"group {group}: a power of two >= 32 dividing K"
    assert out.shape == (N, K) and out.stride(-1) == 1
    block_n = 32
    _w4_dequant_kernel[(triton.cdiv(N, block_n), K // group)](words, scales, zeros, stride_w, stride_g,
                                                              scales.stride(0), out, out.stride(0), N, G=group,
                                                              BLOCK_N=block_n)
    return out
