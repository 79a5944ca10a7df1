"""int4 weights times a few rows on mma.sync, both operands loaded straight into the registers that feed it (Gluon).

A Triton tl.dot takes its operands through shared memory: the tensor-core kernel (w4_tc.py) stores each
step's dequantized weights and x there and reads them back with barriers between (8 STS, 8 LDSM and two
BAR.SYNC a step, one program per SM). Gluon states layouts, so here each lane loads exactly its mma.sync
m16n8k16 fragments from global memory and no shared memory or barrier is used in the main loop:

  y^T [BN, BM] += W [BN, 16] x^T [16, BM] per 16 columns, BM = 8 rows (16 for 9..16), BN = 16 * warps * R

The words layout (convert/layout.pack_words; row-major or, as the runtime stores them, group-major: the kernel
takes a row and a group stride) is unchanged: nibble j of word w of a group is column
j * WG + w, so nibble j of the group's 16 words is a 16-column chunk (G = 128, WG = 16). A dot over a chunk
may take its 16 columns in any order, the same for both operands, so lane (g, t) of a warp takes memory
columns 4t .. 4t+3 of the chunk (one 16-byte load of words per row, one 8-byte load of x) for the fragment
slots 2t, 2t+1, 2t+8, 2t+9: slot s = 8h + 2t + e holds column c = 4t + 2h + e (_slots_a / _x_chunks relabel
the loaded tensors; the conversion to the mma operand layout is then checked to move nothing).

Dequantization: one PRMT pairs byte j/2 of two words, one LOP3 makes (magic + q0, magic + q1) as fp16x2
(magic 1024 for fp16, 128 for bf16: exact), one HSUB2 subtracts magic + z (exact: q - z). The group's sum
is scaled by s in fp32. With a shift for odd nibbles: ~2.4 SASS instructions per weight, no conversions.

The weights load PF = 1-3 groups ahead of their use (a ring of registers; one row's K-slices of one or two groups
want their loads in flight at once). With PRO = 1 the kernel applies the RMSNorm of the fp32 residual itself: the
rstd of its rows first, then h = weight * (x * rstd) per group, rounded as runtime/cpu/model.py rounds (slower than
a norm kernel before it: the per-group norm costs more than the launch it saves; configs ask for it with fuse_norm).

With PRO = 2, x is w13's fp32 sums (gate n, up n at columns 2n, 2n + 1) and the kernel makes h = silu(gate) * up
of each group once per program, in a compact layout moved into the x layout (w2 of a step whose w13 split K: its
slices only add, and no slice waits for the others).

Epilogues as gemv_int4's: store (+ bias), residual (+= into the fp32 residual, atomic under split-K; bias
from the first slice), silu (w13's gate/up row pairs; under split-K the slices add into fp32 sums and the
last to finish applies it). Triton's interpreter cannot run Gluon: w4_matmul.w4_matmul takes its other
kernels there, and this kernel is tested on the GPU (tests/test_gpu_kernels.py).
"""
from __future__ import annotations

import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ....convert.layout import word_strides
from . import rounding
from .arrive import last_to_arrive

_last_arrive = gluon.jit(last_to_arrive)
_act = gluon.jit(rounding.act)
_silu_mul = gluon.jit(rounding.silu_mul)


@gluon.constexpr_function
def _mma(W):
    return ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])


@gluon.constexpr_function
def _words_layout(W, R, BN):
    """Words [BN, 16] of one group by memory column c = 4t + 2h + e: registers c+1, c+2 (16 contiguous bytes), row
    + 8, the R row tiles; lanes t (c+4, c+8) and rows 1, 2, 4; warps rows 16 .. (as the mma layout's rows)."""
    tiles = [[16 * W * i, 0] for i in (1, 2, 4, 8) if i < R]
    return ttgl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0]] + tiles,
                                        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
                                        warp_bases=[[16 * i, 0] for i in (1, 2, 4, 8) if i < W], block_bases=[],
                                        shape=[BN, 16])


@gluon.constexpr_function
def _x_layout(W, BM, G):
    """x^T [G, BM] of one group by memory column (chunk j = column // 16, c = column % 16): registers c+1, c+2
    (8 contiguous bytes), the chunk bits, row 8 (BM = 16); lanes c+4, c+8 and rows 1, 2, 4; warps broadcast."""
    chunks = [[16 * i, 0] for i in (1, 2, 4, 8) if 16 * i < G]
    return ttgl.DistributedLinearLayout(reg_bases=[[1, 0], [2, 0]] + chunks + ([[0, 8]] if BM == 16 else []),
                                        lane_bases=[[4, 0], [8, 0], [0, 1], [0, 2], [0, 4]],
                                        warp_bases=[[0, 0] for i in (1, 2, 4, 8) if i < W], block_bases=[],
                                        shape=[G, BM])


@gluon.constexpr_function
def _pairs_layout(W):
    """[BM, BN] with each thread holding output columns 2i, 2i+1 (w13's gate/up pairs) in registers."""
    return ttgl.BlockedLayout(size_per_thread=[1, 2], threads_per_warp=[8, 4], warps_per_cta=[1, W], order=[1, 0])


@gluon.jit
def _slots_a(t, BN: ttgl.constexpr):
    """[BN, 16] by memory column c = 4t + 2h + e -> by fragment slot s = 8h + 2t + e (no data moves)."""
    return ttgl.reshape(ttgl.permute(ttgl.reshape(t, [BN, 4, 2, 2]), [0, 2, 1, 3]), [BN, 16])


@gluon.jit
def _x_chunks(xg, BM: ttgl.constexpr, lb: ttgl.constexpr):
    """x^T [128, BM] of a group by memory column -> its 8 chunks [16, BM] by fragment slot, in the mma operand
    layout (register renaming only: the conversion asserts that nothing moves)."""
    # [j2, j1, j0, t, h, e, n] -> [h, t, e, n, j2, j1, j0] -> [16 (s = 8h + 2t + e), n, j2, j1, j0]
    x = ttgl.reshape(ttgl.permute(ttgl.reshape(xg, [2, 2, 2, 4, 2, 2, BM]), [4, 3, 5, 6, 0, 1, 2]),
                     [16, BM, 2, 2, 2])
    a, b = ttgl.split(x)          # j0
    a0, a1 = ttgl.split(a)        # j1
    b0, b1 = ttgl.split(b)
    c0, c4 = ttgl.split(a0)       # j2
    c2, c6 = ttgl.split(a1)
    c1, c5 = ttgl.split(b0)
    c3, c7 = ttgl.split(b1)
    return (ttgl.convert_layout(c0, lb, assert_trivial=True), ttgl.convert_layout(c1, lb, assert_trivial=True),
            ttgl.convert_layout(c2, lb, assert_trivial=True), ttgl.convert_layout(c3, lb, assert_trivial=True),
            ttgl.convert_layout(c4, lb, assert_trivial=True), ttgl.convert_layout(c5, lb, assert_trivial=True),
            ttgl.convert_layout(c6, lb, assert_trivial=True), ttgl.convert_layout(c7, lb, assert_trivial=True))


@gluon.jit
def _nibble_pairs(w, j: ttgl.constexpr, MAGIC: ttgl.constexpr, ACT_BF16: ttgl.constexpr):
    """Nibble j of each pair of consecutive words -> (magic + q0, magic + q1) in one 32-bit register: PRMT takes
    byte j // 2 of both words into the two halves, a shift for odd j, LOP3 masks and ORs the magic."""
    B: ttgl.constexpr = j // 2
    SEL: ttgl.constexpr = B | (B << 4) | ((4 + B) << 8) | ((4 + B) << 12)
    MAG: ttgl.constexpr = MAGIC | (MAGIC << 16)
    SHIFT: ttgl.constexpr = "shr.u32 t, t, 4; " if j % 2 == 1 else ""
    return ttgl.inline_asm_elementwise(
        f"{{ .reg .b32 t; prmt.b32 t, $1, $2, {SEL}; {SHIFT}lop3.b32 $0, t, 0x000F000F, {MAG}, 0xea; }}",
        "=r,r,r", [w], dtype=ttgl.bfloat16 if ACT_BF16 else ttgl.float16, is_pure=True, pack=2)


@gluon.jit
def _group(w_rows, z_rows, s_rows, g, stride_g):
    """Group g's words [BN, 16] (the words layout; stride_g words from one group of a row to the next), zeros and
    scales [BN]."""
    return ttgl.load(w_rows + g * stride_g), ttgl.load(z_rows + g), ttgl.load(s_rows + g)


@gluon.jit
def _rstd(x_ptr, stride_xm, pid_m, M, K, eps, BM: ttgl.constexpr, W: ttgl.constexpr, K_POW2: ttgl.constexpr):
    """rsqrt(mean(x^2) + eps) of the program's BM rows of the fp32 residual (rows past M: the last row's),
    [BM]. The chunks are unrolled and summed elementwise, so their loads can all be in flight."""
    CH: ttgl.constexpr = 128 * W if 128 * W < K_POW2 else K_POW2
    lr: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[1, W],
                                            order=[1, 0])
    rows = x_ptr + ttgl.minimum(pid_m * BM + ttgl.arange(0, BM, layout=ttgl.SliceLayout(1, lr)), M - 1) * stride_xm
    ss = ttgl.zeros([BM, CH], ttgl.float32, lr)
    for c in ttgl.static_range(K_POW2 // CH):
        k = c * CH + ttgl.arange(0, CH, layout=ttgl.SliceLayout(0, lr))
        v = ttgl.load(rows[:, None] + k[None, :], mask=(k < K)[None, :], other=0.0)
        ss += v * v
    return 1.0 / ttgl.sqrt(ttgl.sum(ss, axis=1) / K + eps)


@gluon.jit
def _silu_x(x_ptr, stride_xm, pid_m, M, g, G: ttgl.constexpr, BM: ttgl.constexpr, W: ttgl.constexpr,
            ONE_ROW: ttgl.constexpr, ACT_BF16: ttgl.constexpr, lx: ttgl.constexpr):
    """x^T [G, BM] of group g (the layout lx) for a w2 whose input is w13's fp32 sums [M, 2 K] (gate n, up n at
    columns 2n, 2n + 1): h = silu(gate) * up, rounded as rounding.silu_mul rounds. Each value is made once per
    program in a compact layout (gate and up of a column are one 8-byte load), then moved into lx: one row is
    made once and broadcast over the BM columns of x^T."""
    dt: ttgl.constexpr = ttgl.bfloat16 if ACT_BF16 else ttgl.float16
    if ONE_ROW:
        SPT: ttgl.constexpr = G // (32 * W) if G >= 32 * W else 1
        lc: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[SPT, 2], threads_per_warp=[32, 1],
                                                warps_per_cta=[W, 1], order=[1, 0])
        cols = g * G + ttgl.arange(0, G, layout=ttgl.SliceLayout(1, lc))
        pair = ttgl.arange(0, 2, layout=ttgl.SliceLayout(0, lc))
        gate, up = ttgl.split(ttgl.load(x_ptr + 2 * cols[:, None] + pair[None, :]))
        h = ttgl.convert_layout(_silu_mul(gate, up, ACT_BF16).to(dt), ttgl.SliceLayout(1, lx))
        return ttgl.expand_dims(h, 1).broadcast_to([G, BM])
    else:
        SPT3: ttgl.constexpr = G // (32 * W) if G >= 32 * W else 1
        l3: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[BM, SPT3, 2], threads_per_warp=[1, 32, 1],
                                                warps_per_cta=[1, W, 1], order=[2, 1, 0])
        rows = ttgl.minimum(pid_m * BM + ttgl.arange(0, BM, layout=ttgl.SliceLayout(1, ttgl.SliceLayout(2, l3))),
                            M - 1)
        cols = g * G + ttgl.arange(0, G, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, l3)))
        pair = ttgl.arange(0, 2, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, l3)))
        offs = (rows[:, None] * stride_xm + 2 * cols[None, :])[:, :, None] + pair[None, None, :]
        gate, up = ttgl.split(ttgl.load(x_ptr + offs))  # [BM, G] each
        return ttgl.convert_layout(ttgl.permute(_silu_mul(gate, up, ACT_BF16).to(dt), [1, 0]), lx)


@gluon.jit
def _w4_mma_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, stride_w, stride_g, stride_s, b_ptr, y_ptr, stride_ym,
                   M, N, K, SPLIT_K, sa_ptr, stride_sa, cnt_ptr, G: ttgl.constexpr, PRO: ttgl.constexpr,
                   EPI: ttgl.constexpr, ATOMIC: ttgl.constexpr, HAS_BIAS: ttgl.constexpr, ACT_BF16: ttgl.constexpr,
                   W: ttgl.constexpr, R: ttgl.constexpr, BM: ttgl.constexpr, PF: ttgl.constexpr,
                   K_POW2: ttgl.constexpr, SPLIT_SILU: ttgl.constexpr, ONE_ROW: ttgl.constexpr,
                   PDL: ttgl.constexpr):
    """Program (n block, K-slice, m block): outputs BN = 16 W R, rows BM, the groups of its K-slice; each group's
    weights load PF groups ahead of their use (x, read by every program, comes from L1 / L2 in its group).
    PRO == 1: x is the fp32 residual and h = RMSNorm(x): rstd of each row first (the whole row, from L2), then
    h = weight * (x * rstd) per group, rounded to the activation dtype as runtime/cpu/model.py rounds. PRO == 2: x is
    w13's fp32 sums [M, 2 K] and h = silu(gate) * up per group (_silu_x)."""
    BN: ttgl.constexpr = 16 * W * R
    mma: ttgl.constexpr = _mma(W)
    la: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    lb: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    lw: ttgl.constexpr = _words_layout(W, R, BN)
    lx: ttgl.constexpr = _x_layout(W, BM, G)
    dt: ttgl.constexpr = ttgl.bfloat16 if ACT_BF16 else ttgl.float16
    MAGIC: ttgl.constexpr = 0x4300 if ACT_BF16 else 0x6400  # 128.0 bf16 / 1024.0 fp16: magic | q is magic + q
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_n, pid_k, pid_m = ttgl.program_id(0), ttgl.program_id(1), ttgl.program_id(2)
    per = ttgl.cdiv(K // G, SPLIT_K)
    g_lo = pid_k * per
    g_hi = ttgl.minimum(g_lo + per, K // G)
    # Rows past N (weights) or M (x) read the last row instead, so that no load needs a mask: they only feed
    # outputs that are never stored. Likewise the prefetch past the slice's last group reloads that group
    rn_w = ttgl.minimum(pid_n * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, lw)), N - 1)
    w_rows = w_ptr + rn_w[:, None] * stride_w + ttgl.arange(0, 16, layout=ttgl.SliceLayout(0, lw))[None, :]
    z_rows = z_ptr + ttgl.minimum(pid_n * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, la)), N - 1) * stride_s
    rn = pid_n * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, mma))
    n_ok = rn < N
    s_rows = s_ptr + ttgl.minimum(rn, N - 1) * stride_s
    rm_x = ttgl.minimum(pid_m * BM + ttgl.arange(0, BM, layout=ttgl.SliceLayout(0, lx)), M - 1)
    x_rows = x_ptr + rm_x[None, :] * stride_xm + ttgl.arange(0, G, layout=ttgl.SliceLayout(1, lx))[:, None]
    # the first PF groups' weights do not depend on the previous kernel: with PDL they load before waiting for it
    g_last = ttgl.maximum(g_hi - 1, 0)  # (a slice past the last group has none and stores zeros)
    wm, zq, sc = _group(w_rows, z_rows, s_rows, ttgl.minimum(g_lo, g_last), stride_g)
    wm1, zq1, sc1 = wm, zq, sc
    wm2, zq2, sc2 = wm, zq, sc
    if PF >= 2:
        wm1, zq1, sc1 = _group(w_rows, z_rows, s_rows, ttgl.minimum(g_lo + 1, g_last), stride_g)
    if PF >= 3:
        wm2, zq2, sc2 = _group(w_rows, z_rows, s_rows, ttgl.minimum(g_lo + 2, g_last), stride_g)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PRO == 1:
        rstd = ttgl.convert_layout(_rstd(x_ptr, stride_xm, pid_m, M, K, eps, BM, W, K_POW2), ttgl.SliceLayout(0, lx))
        nw_cols = nw_ptr + ttgl.arange(0, G, layout=ttgl.SliceLayout(1, lx))
    total = ttgl.zeros([BN, BM], ttgl.float32, mma)
    for g in range(g_lo, g_hi):
        # the weights PF groups on, loading while this group's arithmetic runs (past the slice: its last again)
        wm_n, zq_n, sc_n = _group(w_rows, z_rows, s_rows, ttgl.minimum(g + PF, g_last), stride_g)
        if PRO == 2:  # SiLU-mul of w13's sums (read by every program: from L2)
            xg = _silu_x(x_ptr, stride_xm, pid_m, M, g, G, BM, W, ONE_ROW, ACT_BF16, lx)
        else:
            xg = ttgl.load(x_rows + g * G)  # x is read by every program: from L1 / L2
        if PRO == 1:
            nwg = ttgl.load(nw_cols + g * G).to(ttgl.float32)
            xg = _act(_act(xg * rstd[None, :], ACT_BF16) * nwg[:, None], ACT_BF16).to(dt)
        xs = _x_chunks(xg, BM, lb)
        w = ttgl.convert_layout(_slots_a(wm, BN), la, assert_trivial=True)
        zh = ((zq.to(ttgl.int16) | MAGIC).to(dt, bitcast=True))[:, None]   # magic + z
        acc = ttgl.zeros([BN, BM], ttgl.float32, mma)
        for j in ttgl.static_range(8):
            acc = mma_v2(_nibble_pairs(w, j, MAGIC, ACT_BF16) - zh, xs[j], acc)  # (q - z) x over chunk j
        total += sc.to(ttgl.float32)[:, None] * acc
        if PF == 1:
            wm, zq, sc = wm_n, zq_n, sc_n
        elif PF == 2:
            wm, zq, sc, wm1, zq1, sc1 = wm1, zq1, sc1, wm_n, zq_n, sc_n
        else:
            wm, zq, sc, wm1, zq1, sc1, wm2, zq2, sc2 = wm1, zq1, sc1, wm2, zq2, sc2, wm_n, zq_n, sc_n
    rm = pid_m * BM + ttgl.arange(0, BM, layout=ttgl.SliceLayout(0, mma))
    m_ok = rm < M
    mask = n_ok[:, None] & m_ok[None, :]
    if HAS_BIAS:
        total += ttgl.load(b_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(ttgl.float32)[:, None]
    y = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    if EPI == 0:
        ttgl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)
    elif EPI == 1:
        if ATOMIC:
            ttgl.atomic_add(y, total, mask=mask, sem="relaxed")
        else:
            ttgl.store(y, ttgl.load(y, mask=mask, other=0.0) + total, mask=mask)
    else:
        lp: ttgl.constexpr = _pairs_layout(W)
        rm_p = pid_m * BM + ttgl.arange(0, BM, layout=ttgl.SliceLayout(1, lp))
        rn_p = pid_n * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(0, lp))
        mask_p = (rm_p < M)[:, None] & (rn_p < N)[None, :]
        if SPLIT_SILU:  # every slice adds its sums; the last of the tile to finish applies SiLU-mul
            sums = sa_ptr + rm[None, :] * stride_sa + rn[:, None]
            ttgl.atomic_add(sums, total, mask=mask, sem="relaxed")
            tile = pid_n + ttgl.num_programs(0) * pid_m
            if _last_arrive(cnt_ptr + tile, SPLIT_K, True):
                sums_p = sa_ptr + rm_p[:, None] * stride_sa + rn_p[None, :]
                t = ttgl.load(sums_p, mask=mask_p, other=0.0, cache_modifier=".cg")
                ttgl.store(sums_p, ttgl.zeros_like(t), mask=mask_p)
                _silu_store(t, y_ptr, stride_ym, rm_p, rn_p, mask_p, BM, BN, ACT_BF16)
        else:
            t = ttgl.convert_layout(ttgl.permute(total, [1, 0]), lp)
            _silu_store(t, y_ptr, stride_ym, rm_p, rn_p, mask_p, BM, BN, ACT_BF16)


@gluon.jit
def _silu_store(t, y_ptr, stride_ym, rm, rn, mask, BM: ttgl.constexpr, BN: ttgl.constexpr, ACT_BF16: ttgl.constexpr):
    """t [BM, BN] (pair layout) of w13's interleaved gate/up outputs: y[:, n // 2] = silu(gate) * up, rounded as
    gemv_int4._epilogue rounds (kernels/rounding.py)."""
    gate, up = ttgl.split(ttgl.reshape(t, [BM, BN // 2, 2]))
    h = _silu_mul(gate, up, ACT_BF16)
    offs, _ = ttgl.split(ttgl.reshape(rm[:, None] * stride_ym + (rn // 2)[None, :], [BM, BN // 2, 2]))
    ok, _ = ttgl.split(ttgl.reshape(mask, [BM, BN // 2, 2]))
    ttgl.store(y_ptr + offs, h.to(y_ptr.dtype.element_ty), mask=ok)


def launch(x, words, scales, zeros, group: int, out, bias, epi: int, split_k: int, warps: int, block_n: int,
           act_bf16: bool, on: bool, sums=None, norm_weight=None, eps: float = 0.0, pf: int = 1,
           silu_x: bool = False) -> None:
    """The kernel for w4_matmul.w4_matmul, which has checked the shapes: BM = 8 or 16 rows per program (more rows:
    more programs along the grid's third axis), block_n = 16 * warps * R outputs, the weights pf groups ahead;
    with norm_weight, x is the fp32 residual and the kernel applies the RMSNorm; with silu_x, x is w13's fp32 sums
    [M, 2 K] and the kernel applies the SiLU-mul."""
    N, K, stride_w, stride_g = word_strides(words, group)  # row-major or group-major words
    M = x.shape[0]
    R = block_n // (16 * warps)
    assert group == 128 and R in (1, 2, 4, 8) and block_n == 16 * warps * R, f"group {group}, block_n {block_n}"
    assert pf in (1, 2, 3), f"pf={pf}: the weights load 1 to 3 groups ahead"
    bm = 8 if M <= 8 else 16
    grid = (-(-N // block_n), split_k, -(-M // bm))
    acc, cnt = sums if sums is not None else (out, out)
    _w4_mma_kernel[grid](x, x.stride(0), norm_weight if norm_weight is not None else scales, eps, words, scales, zeros,
                         stride_w, stride_g, scales.stride(0), bias if bias is not None else scales, out, out.stride(0),
                         M, N, K, split_k, acc, acc.stride(0), cnt, G=group,
                         PRO=2 if silu_x else int(norm_weight is not None), EPI=epi, ATOMIC=split_k > 1,
                         HAS_BIAS=bias is not None, ACT_BF16=act_bf16, W=warps, R=R, BM=bm, PF=pf,
                         K_POW2=1 << (K - 1).bit_length() if norm_weight is not None else 1,  # (read by the norm only)
                         SPLIT_SILU=epi == 2 and split_k > 1, ONE_ROW=M == 1,
                         PDL=on, num_warps=warps, launch_pdl=on)
