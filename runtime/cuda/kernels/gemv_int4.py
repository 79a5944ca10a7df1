"""int4 weights times a few rows (decode), and the whole weight dequantized (prefill): the shared jit helpers
and the CUDA-core and tl.dot kernels (the tensor-core kernel: w4_tc.py; the host side: w4_matmul.py).

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
  _w4_tc_kernel    (w4_tc.py) the weights as the left tensor-core operand
  _w4_dequant_kernel  the whole weight as (q - z) * s, for prefill's dense matmul
Fused around y = h W^T (PRO and EPI, numbered as w4_matmul.PROLOGUES and EPILOGUES):
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

import triton
import triton.language as tl

from . import rounding


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
