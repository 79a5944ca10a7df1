"""The int4 tensor-core kernel: the weights as the left tl.dot operand (Hopper's wgmma takes them from registers
at BLOCK_N >= 64). One LOP3 makes two fp16 1024 + q of a word's nibbles a and a+4, x is loaded in that
(bit-reversed nibble) column order, and up to BLOCK_M rows share one pass over the weights. Layout, prologues and
epilogues as gemv_int4.py's (whose jit helpers it calls); launched by w4_matmul.w4_matmul, which also takes it in
place of an mma config that cannot run (w4_matmul.mma_fallback). Under split-K the SiLU-mul epilogue adds the
slices' sums into an fp32 buffer and the last slice to finish applies it (_silu_last_slice).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .arrive import _last_to_arrive
from .gemv_int4 import _act, _epilogue, _f16_1024, _rstd, _slice, _tile


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
