"""int4 weights times a few rows (decode), and the whole weight dequantized (prefill).

The weights stay in the workspace layout of convert/layout.py, read as they are:
  codes  uint8 [N, K/2]   byte j of a row = column 2j (low nibble) | column 2j+1 (high nibble) << 4
  scales fp16  [N, K/G],  zeros uint8 [N, K/G];   w[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]

A program computes BLOCK_N outputs over one K-slice: groups g_lo .. g_hi-1 of G columns, the K/G groups
shared out over SPLIT_K slices (a run-time argument, so one compiled kernel serves every split). Each
step loads one group, a [BLOCK_N, G/2] byte tile (16-byte loads along K; K is a multiple of G, so no
mask along K), and one scale and zero per row; the nibbles are interleaved back into column order
[BLOCK_N, G], so the input is read contiguously. Two kernels:
  _gemv  one input row per program, CUDA cores: [BLOCK_N, G/2] fp32 partial sums over even and odd
         columns, reduced once at the end (no barrier inside the loop), the next group prefetched
  _gemm  BLOCK_M (>= 16) rows per program through tl.dot, whose loads Triton pipelines (num_stages);
         also used for a single row, padded
Fused around y = h W^T:
  prologue  none:      h = x                                               x: [M, K]
            rmsnorm:   h = x * rsqrt(mean(x^2) + eps) * norm_w             x: the fp32 residual [M, K]
            silu_mul:  h = silu(x[:, :K]) * x[:, K:]                       x: gate | up [M, 2K]
  epilogue  store:     out = y + bias                  (SPLIT_K must be 1: one program owns an output)
            residual:  out += y   (out: the fp32 residual [M, N]; atomic adds when SPLIT_K > 1)
h is rounded to the activation dtype where the dense model rounds (runtime/model.py), except in _gemv
with one K-slice: there RMSNorm is applied as  y = rstd * (x * norm_w) W^T  in fp32 (rstd is a per-row
scalar), so sum(x^2) accumulates in the main loop and no pass over x precedes the weight loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl

PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}


@triton.jit
def _act(v, ACT_BF16: tl.constexpr):
    """v rounded to the activation dtype, back in fp32."""
    if ACT_BF16:
        return v.to(tl.bfloat16).to(tl.float32)
    else:
        return v.to(tl.float16).to(tl.float32)


@triton.jit
def _input(x_rows, k, mask, K, rstd, nw_ptr, PRO: tl.constexpr, ACT_BF16: tl.constexpr):
    """h at columns k of rows x_rows (pointers, broadcast against k), fp32."""
    if PRO == 1:
        v = tl.load(x_rows + k, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + k, mask=mask, other=0.0).to(tl.float32)
        h = _act(_act(v * rstd, ACT_BF16) * w, ACT_BF16)        # weight * (x * rstd).to(dtype)
    elif PRO == 2:
        g = tl.load(x_rows + k, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_rows + K + k, mask=mask, other=0.0).to(tl.float32)
        h = _act(_act(g * tl.sigmoid(g), ACT_BF16) * u, ACT_BF16)  # silu(gate) * up
    else:
        h = tl.load(x_rows + k, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _group(w_ptr, s_ptr, z_ptr, stride_w, stride_s, rn, n_ok, g, G: tl.constexpr):
    """Group g of rows rn: the code bytes uint8 [BLOCK_N, G/2], scales fp16 and zeros uint8 [BLOCK_N]."""
    j = tl.arange(0, G // 2)
    q = tl.load(w_ptr + rn[:, None] * stride_w + (g * (G // 2) + j)[None, :], mask=n_ok[:, None], other=0)
    s = tl.load(s_ptr + rn * stride_s + g, mask=n_ok, other=0.0)
    z = tl.load(z_ptr + rn * stride_s + g, mask=n_ok, other=0)
    return q, s, z


@triton.jit
def _unpack(q, dtype: tl.constexpr):
    """Code bytes [R, G/2] -> codes [R, G] in ``dtype``, in column order (byte j -> columns 2j, 2j+1)."""
    return tl.interleave((q & 0xF).to(dtype), (q >> 4).to(dtype))


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
def _epilogue(acc, y, mask, b_ptr, rn, n_ok, pid_k, RESIDUAL: tl.constexpr, ATOMIC: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """acc [R, BLOCK_N] (+ bias, from the first K-slice) stored into, or added to, y ([R, BLOCK_N] pointers)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        if ATOMIC:
            tl.atomic_add(y, acc, mask=mask)
        else:
            tl.store(y, tl.load(y, mask=mask, other=0.0) + acc, mask=mask)
    else:
        tl.store(y, acc.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _w4_gemv_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, stride_w, stride_s, b_ptr, y_ptr, stride_ym,
                    N, K, SPLIT_K, G: tl.constexpr, PRO: tl.constexpr, RESIDUAL: tl.constexpr, ATOMIC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, LATE_NORM: tl.constexpr,
                    K_POW2: tl.constexpr, CHUNK: tl.constexpr, GPS: tl.constexpr, PDL: tl.constexpr):
    """One row. Each step loads GPS groups as one [BLOCK_N, GPS * G/2] byte tile (H100, w13 of qwen2.5-1.5b:
    GPS=4 moved 1.22 TB/s against 0.63 with one group per step: more bytes in flight per program). Per group:
        sum_k (q - z) * s * h = s * (sum_k q * h - z * sum_k h),
    so the tile multiplies codes by h directly, and the [BLOCK_N, GPS] group sums get s and z once.
    With PDL the first tile is loaded before waiting for the previous kernel (weights are never written),
    and each step loads the next tile before its arithmetic."""
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    x_row = x_ptr + m * stride_xm
    g_lo, g_hi = _slice(K, SPLIT_K, pid_k, G)
    B: tl.constexpr = GPS * G // 2
    j = tl.arange(0, B)           # byte j of the tile: columns 2j (low nibble) and 2j + 1 (high nibble)
    w_rows = w_ptr + rn[:, None] * stride_w + j[None, :]
    q = tl.load(w_rows + g_lo * (G // 2), mask=n_ok[:, None] & (g_lo * (G // 2) + j < g_hi * (G // 2))[None, :],
                other=0)  # [BN, B] uint8, the first step's tile
    if PDL:
        tl.extra.cuda.gdc_wait()
    rstd = 1.0
    if PRO == 1 and not LATE_NORM:  # this K-slice needs the whole row's rsqrt(mean(x^2) + eps) first
        rstd = tl.sum(_rstd(x_row + tl.zeros([1, 1], tl.int32), tl.full([1, 1], 1, tl.int1), K, eps, 1, K_POW2,
                            CHUNK))
    gu = tl.arange(0, GPS)
    acc = tl.zeros([BLOCK_N, GPS], tl.float32)
    sq = tl.zeros([B], tl.float32)
    for g0 in range(g_lo, g_hi, GPS):
        c_ok = g0 * (G // 2) + j < g_hi * (G // 2)  # the last step of a slice may hold fewer groups
        nxt = (g0 + GPS) * (G // 2) + j < g_hi * (G // 2)
        q_next = tl.load(w_rows + (g0 + GPS) * (G // 2), mask=n_ok[:, None] & nxt[None, :], other=0)
        k = g0 * G + 2 * j
        if LATE_NORM:  # h = x * norm_w now, times rstd at the end
            xe = tl.load(x_row + k, mask=c_ok, other=0.0).to(tl.float32)
            xo = tl.load(x_row + k + 1, mask=c_ok, other=0.0).to(tl.float32)
            sq += xe * xe + xo * xo
            xe = xe * tl.load(nw_ptr + k, mask=c_ok, other=0.0).to(tl.float32)
            xo = xo * tl.load(nw_ptr + k + 1, mask=c_ok, other=0.0).to(tl.float32)
        else:
            xe = _input(x_row, k, c_ok, K, rstd, nw_ptr, PRO, ACT_BF16)
            xo = _input(x_row, k + 1, c_ok, K, rstd, nw_ptr, PRO, ACT_BF16)
        p = (q & 0xF).to(tl.float32) * xe[None, :] + (q >> 4).to(tl.float32) * xo[None, :]  # [BN, B]
        qh = tl.sum(tl.reshape(p, [BLOCK_N, GPS, G // 2]), axis=2)  # sum q * h per group: [BN, GPS]
        hs = tl.sum(tl.reshape(xe + xo, [GPS, G // 2]), axis=1)     # sum h per group: [GPS]
        g_ok = n_ok[:, None] & (g0 + gu < g_hi)[None, :]
        sz = rn[:, None] * stride_s + (g0 + gu)[None, :]
        sc = tl.load(s_ptr + sz, mask=g_ok, other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + sz, mask=g_ok, other=0).to(tl.float32)
        acc += sc * (qh - zp * hs[None, :])
        q = q_next
    out = tl.sum(acc, axis=1)
    if LATE_NORM:
        out = out / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    _epilogue(out[None, :], (y_ptr + m * stride_ym + rn)[None, :], n_ok[None, :], b_ptr, rn, n_ok, pid_k, RESIDUAL,
              ATOMIC, HAS_BIAS)


@triton.jit
def _w4_gemm_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, stride_w, stride_s, b_ptr, y_ptr, stride_ym,
                    M, N, K, SPLIT_K, G: tl.constexpr, PRO: tl.constexpr, RESIDUAL: tl.constexpr,
                    ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, K_POW2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * stride_xm  # [BM, 1]
    rstd = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    if PRO == 1:  # first: h is rounded to fp16 / bf16 for tl.dot, so it must be normalized before
        rstd = _rstd(x_rows, m_ok[:, None], K, eps, BLOCK_M, K_POW2, CHUNK)
    g_lo, g_hi = _slice(K, SPLIT_K, pid_k, G)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(g_lo, g_hi):
        q, s, z = _group(w_ptr, s_ptr, z_ptr, stride_w, stride_s, rn, n_ok, g, G)
        x = _input(x_rows, (g * G + tl.arange(0, G))[None, :], m_ok[:, None], K, rstd, nw_ptr, PRO, ACT_BF16)
        if ACT_BF16:  # w = (q - z) * s, rounded once
            w = ((_unpack(q, tl.float32) - z.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]).to(tl.bfloat16)
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w))
        else:  # q - z is exact in fp16 and s is fp16: one rounding, as in fp32
            w = (_unpack(q, tl.float16) - z.to(tl.float16)[:, None]) * s[:, None]
            acc += tl.dot(x.to(tl.float16), tl.trans(w))
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    _epilogue(acc, y, m_ok[:, None] & n_ok[None, :], b_ptr, rn, n_ok, pid_k, RESIDUAL, ATOMIC, HAS_BIAS)


@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, stride_w, stride_s, out_ptr, stride_o, N, G: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_ok = rn < N
    q, s, z = _group(w_ptr, s_ptr, z_ptr, stride_w, stride_s, rn, n_ok, g, G)
    w = (_unpack(q, tl.float32) - z.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]  # [BN, G]
    kk = g * G + tl.arange(0, G)
    tl.store(out_ptr + rn[:, None] * stride_o + kk[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3   # _gemm's pipeline depth
    dot: bool = True      # one row through _gemm (padded to 16) rather than _gemv
    gps: int = 4          # _gemv: groups per loop step


# Per-shape choices from bench/gpu_runtime.py (kernels step) on the H100: {(M bucket, N, K): config}.
# Shapes not listed use ``default_config``. M bucket: 1, or 16 for 2..16 rows.
# One row: the H100 sweep of 2026-11-22 (.scratch run, GPS groups per step; bench/RESULTS.md). Several rows:
# bench/gpu_runtime.py's kernels step of the same day.
TUNED: dict[tuple[int, int, int], GemvConfig] = {
    (1, 2048, 1536): GemvConfig(16, 1, 8, 1, False, 4),    # qkv
    (1, 1536, 1536): GemvConfig(16, 1, 8, 1, False, 4),    # o
    (1, 17920, 1536): GemvConfig(16, 1, 4, 1, False, 4),   # w13
    (1, 1536, 8960): GemvConfig(16, 2, 8, 1, False, 4),    # w2
    (16, 1536, 1536): GemvConfig(32, 4, 4, 3, True),
    (16, 1536, 8960): GemvConfig(64, 16, 4, 3, True),
    (16, 2048, 1536): GemvConfig(64, 4, 4, 3, True),
    (16, 17920, 1536): GemvConfig(64, 1, 4, 3, True),
}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(M: int, N: int, K: int, group: int, residual: bool, sms: int = 132,
                   prologue: str = "none") -> GemvConfig:
    """Untuned shapes: BLOCK_N 32 (64 when that still gives 4 programs per SM); split-K (only with the
    residual epilogue, whose adds can be atomic) until there are about two programs per SM; one row goes
    through _gemv when the prologue is RMSNorm (no pass over x before the loop), else through _gemm."""
    tuned = TUNED.get((1 if M <= 1 else 16, N, K))
    if tuned is not None and (tuned.split_k == 1 or residual):
        return tuned
    block_n = 64 if N >= 4 * sms * 64 else 32
    split, groups = 1, K // group
    if residual:
        n_blocks = -(-N // block_n)
        while n_blocks * split * 2 <= 2 * sms and groups // (split * 2) >= 2:
            split *= 2
    return GemvConfig(block_n, split, dot=not (M == 1 and prologue == "rmsnorm"))


def w4_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
              out: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: bool = False,
              config: GemvConfig | None = None) -> torch.Tensor:
    """out = h(x) W^T (+ bias), or out += h(x) W^T with ``residual``; out: [M, N], x: [M, K] ([M, 2K] silu_mul)."""
    N, K = codes.shape[0], 2 * codes.shape[1]
    M = x.shape[0]
    pro = PROLOGUES[prologue]
    assert codes.dtype == torch.uint8 and codes.stride(-1) == 1, "codes: uint8 [N, K/2], rows contiguous"
    assert scales.shape == zeros.shape == (N, K // group) and scales.stride() == zeros.stride() and scales.stride(-1) == 1
    assert zeros.dtype == torch.uint8, "zeros: uint8 [N, K/G]"
    assert group >= 32 and group & (group - 1) == 0 and K % group == 0, f"group {group}: a power of two >= 32 dividing K"
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] == (2 * K if pro == 2 else K), f"x {tuple(x.shape)}, K={K}"
    assert out.dim() == 2 and out.shape == (M, N) and out.stride(-1) == 1, f"out {tuple(out.shape)} for [{M}, {N}]"
    assert not residual or out.dtype == torch.float32, "the residual is float32"
    assert pro != 1 or (norm_weight is not None and norm_weight.shape == (K,) and norm_weight.is_contiguous())
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous())
    act = out.dtype if not residual else (x.dtype if pro != 1 else norm_weight.dtype)
    assert act in (torch.float16, torch.bfloat16), f"activations must be fp16 or bf16, got {act}"
    cfg = config or default_config(M, N, K, group, residual, prologue=prologue)
    assert cfg.split_k == 1 or residual, "split-K needs the residual epilogue (atomic adds)"
    nw = norm_weight if norm_weight is not None else scales  # unused pointer when the prologue has no norm
    b = bias if bias is not None else scales
    on = pdl(x)
    common = dict(G=group, PRO=pro, RESIDUAL=residual, ATOMIC=cfg.split_k > 1, HAS_BIAS=bias is not None,
                  ACT_BF16=act == torch.bfloat16, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, PDL=on, launch_pdl=on)
    weights = (codes, scales, zeros, codes.stride(0), scales.stride(0))
    n_blocks = triton.cdiv(N, cfg.block_n)
    k_pow2 = triton.next_power_of_2(K)
    if M == 1 and not cfg.dot:
        _w4_gemv_kernel[(n_blocks, cfg.split_k, 1)](x, x.stride(0), nw, eps, *weights, b, out, out.stride(0), N, K,
                                                    cfg.split_k, LATE_NORM=pro == 1 and cfg.split_k == 1,
                                                    K_POW2=k_pow2, CHUNK=min(k_pow2, 4096), GPS=cfg.gps, **common)
    else:  # the RMSNorm pass takes [BLOCK_M, CHUNK] elements at a time: 32 per thread with 4 warps
        block_m = min(64, max(16, _pow2_at_least(M)))
        _w4_gemm_kernel[(n_blocks, cfg.split_k, triton.cdiv(M, block_m))](
            x, x.stride(0), nw, eps, *weights, b, out, out.stride(0), M, N, K, cfg.split_k, BLOCK_M=block_m,
            K_POW2=k_pow2, CHUNK=min(k_pow2, 4096 // block_m), **common)
    return out


def w4_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  out: torch.Tensor) -> torch.Tensor:
    """out [N, K] = (q - z) * s in out's dtype (prefill: then a dense matmul)."""
    N, K = codes.shape[0], 2 * codes.shape[1]
    assert codes.dtype == torch.uint8 and codes.stride(-1) == 1 and scales.stride() == zeros.stride()
    assert group >= 32 and group & (group - 1) == 0 and K % group == 0, f"group {group}: a power of two >= 32 dividing K"
    assert out.shape == (N, K) and out.stride(-1) == 1
    block_n = 32
    _w4_dequant_kernel[(triton.cdiv(N, block_n), K // group)](codes, scales, zeros, codes.stride(0), scales.stride(0),
                                                              out, out.stride(0), N, G=group, BLOCK_N=block_n)
    return out
