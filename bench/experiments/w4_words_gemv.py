"""EXPERIMENT (not used by the runtime; bench/GPU_NOTES.md has its numbers): int4 GEMV over int32 words with magic-number dequant (no I2F), permuted-within-group packing.

codes int32 [N, K/8]: word w (0..WG-1, WG = G/8) of group g, bits 4i..4i+3 = column g*G + i*WG + w.
Tile [C, BN, V]: C = 32 * num_warps thread-columns (each V consecutive words, one LDG of 4V bytes per row),
BN rows in every thread's registers, so x is loaded and prepared once per thread, not once per row.
"""
import triton
import triton.language as tl

from qconv.runtime.kernels.gemv_int4 import _act


@triton.jit
def _lop3(w, MASK: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """(w & MASK) | MAGIC as a float32: one LOP3 (the compiler splits it in two when written in Triton)."""
    if not ASM:
        return ((w & MASK) | MAGIC).to(tl.float32, bitcast=True)
    return tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {MASK}, {MAGIC}, 0xea;", "=r,r", [w], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def gemv32(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, stride_w, stride_s, b_ptr, y_ptr, stride_ym,
           N, K, SPLIT_K, G: tl.constexpr, PRO: tl.constexpr, EPI: tl.constexpr, ATOMIC: tl.constexpr,
           HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, V: tl.constexpr,
           C: tl.constexpr, ASM: tl.constexpr = True, PDL: tl.constexpr = False):
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    WG: tl.constexpr = G // 8          # words per group
    TPG: tl.constexpr = WG // V        # thread-columns per group
    GPS: tl.constexpr = C // TPG       # groups per step
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, C)
    v = tl.arange(0, V)
    ng = K // G
    per = tl.cdiv(ng, SPLIT_K)
    g_lo = pid_k * per
    g_hi = tl.minimum(g_lo + per, ng)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([C, BLOCK_N], tl.float32)
    sq = tl.zeros([C, 1, V], tl.float32)
    wcol = ((c % TPG) * V)[:, None, None] + v[None, None, :]            # word within its group [C, 1, V]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # the first step's weights are loaded before waiting for the previous kernel (they do not depend on it)
    g = g_lo + c // TPG
    c_ok = g < g_hi
    w = tl.load(w_ptr + rn[None, :, None] * stride_w + (g[:, None, None] * WG + wcol), mask=c_ok[:, None, None],
                other=0)
    sz = rn[None, :] * stride_s + g[:, None]
    sc = tl.load(s_ptr + sz, mask=c_ok[:, None], other=0.0)
    zp = tl.load(z_ptr + sz, mask=c_ok[:, None], other=0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    for g0 in range(g_lo, g_hi, GPS):
        gn = g + GPS                                                     # prefetch the next step's weights
        n_ok = gn < g_hi
        w_n = tl.load(w_ptr + rn[None, :, None] * stride_w + (gn[:, None, None] * WG + wcol),
                      mask=n_ok[:, None, None], other=0)
        sz = rn[None, :] * stride_s + gn[:, None]
        sc_n = tl.load(s_ptr + sz, mask=n_ok[:, None], other=0.0)
        zp_n = tl.load(z_ptr + sz, mask=n_ok[:, None], other=0)
        w_hi = w >> 20
        p = tl.zeros([C, BLOCK_N, V], tl.float32)
        xs = tl.zeros([C, 1, V], tl.float32)
        for i in tl.static_range(8):
            col = g[:, None, None] * G + i * WG + wcol
            xi = tl.load(x_row + col, mask=c_ok[:, None, None], other=0.0).to(tl.float32)
            if PRO == 1:
                sq += xi * xi
                xi = xi * tl.load(nw_ptr + col, mask=c_ok[:, None, None], other=0.0).to(tl.float32)
            xs += xi
            if i < 5:
                t = _lop3(w, 0xF << (4 * i), (150 - 4 * i) << 23, ASM) - (1 << (23 - 4 * i))
            else:
                t = _lop3(w_hi, 0xF << (4 * i - 20), (170 - 4 * i) << 23, ASM) - (1 << (43 - 4 * i))
            p += t * xi
        acc += sc.to(tl.float32) * (tl.sum(p, axis=2) - zp.to(tl.float32) * tl.sum(xs, axis=2))
        w, sc, zp, g, c_ok = w_n, sc_n, zp_n, gn, n_ok
    out = tl.sum(acc, axis=0)                                            # [BN]
    if PRO == 1:
        out = out / tl.sqrt(tl.sum(tl.sum(tl.sum(sq, axis=2), axis=1), axis=0) / K + eps)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=pid_k == 0, other=0.0).to(tl.float32)
    if EPI == 0:
        tl.store(y_ptr + m * stride_ym + rn, out.to(y_ptr.dtype.element_ty))
    elif EPI == 1:
        if ATOMIC:
            tl.atomic_add(y_ptr + m * stride_ym + rn, out)
        else:
            y = y_ptr + m * stride_ym + rn
            tl.store(y, tl.load(y) + out)
    else:  # rows 2n, 2n+1 = gate n, up n -> h[n] = silu(gate) * up
        gt, up = tl.split(tl.reshape(out, [BLOCK_N // 2, 2]))
        gt = _act(gt, ACT_BF16)
        h = _act(_act(gt * tl.sigmoid(gt), ACT_BF16) * _act(up, ACT_BF16), ACT_BF16)
        tl.store(y_ptr + m * stride_ym + pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2), h.to(y_ptr.dtype.element_ty))
