"""int4 weights times a few rows (decode), and the whole weight dequantized (prefill).

The weights stay in the workspace layout of convert/layout.py, read as they are:
  codes  uint8 [N, K/2]   byte j of a row = column 2j (low nibble) | column 2j+1 (high nibble) << 4
  scales fp16  [N, K/G],  zeros uint8 [N, K/G];   w[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]

A program computes BLOCK_N outputs over one K-slice (K / SPLIT_K, rounded up to BLOCK_K; SPLIT_K is a
run-time argument, so one compiled kernel serves every split). Each step
loads a [BLOCK_N, BLOCK_K/2] byte tile; BLOCK_K is a power-of-two multiple of G, so the tile views as
[BLOCK_N, BLOCK_K/G, G/2] and scale and zero apply per group. Rows of the input are one program each
(``_gemv``, M = 1) or a tl.dot block of BLOCK_M rows (``_gemm``, a handful of decode rows).

Fused around y = h W^T:
  prologue  none:      h = x                                               x: [M, K]
            rmsnorm:   h = x * rsqrt(mean(x^2) + eps) * norm_w             x: the fp32 residual [M, K]
            silu_mul:  h = silu(x[:, :K]) * x[:, K:]                       x: gate | up [M, 2K]
  epilogue  store:     out = y + bias                  (SPLIT_K must be 1: one program owns an output)
            residual:  out += y   (out: the fp32 residual [M, N]; atomic adds when SPLIT_K > 1)
h is rounded to the activation dtype where the dense model rounds (runtime/model.py), except in the
one-row kernel with one K-slice: there RMSNorm is applied as  y = rstd * (x * norm_w) W^T  in fp32
(rstd is a per-row scalar), so sum(x^2) accumulates in the main loop and no pass over x precedes the
weight loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def _codes(w_ptr, s_ptr, z_ptr, rn, n_ok, k0, K, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of rows rn, columns k0 + 2j (lo) and k0 + 2j + 1 (hi) as fp32 [BLOCK_N, BLOCK_K/G, G/2] each,
    and the tile's scales and zeros as fp32 [BLOCK_N, BLOCK_K/G]."""
    HALF: tl.constexpr = BLOCK_K // 2
    GPB: tl.constexpr = BLOCK_K // G
    j = tl.arange(0, HALF)
    k_ok = (k0 + 2 * j) < K
    q = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                other=0)  # uint8 [BN, BK/2]
    gi = k0 // G + tl.arange(0, GPB)
    g_mask = n_ok[:, None] & (gi < K // G)[None, :]
    s = tl.load(s_ptr + rn[:, None] * (K // G) + gi[None, :], mask=g_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rn[:, None] * (K // G) + gi[None, :], mask=g_mask, other=0).to(tl.float32)
    lo = tl.reshape((q & 0xF).to(tl.float32), [BLOCK_N, GPB, G // 2])  # [BN, BK/2] -> [BN, BK/G, G/2]
    hi = tl.reshape((q >> 4).to(tl.float32), [BLOCK_N, GPB, G // 2])
    return lo, hi, s, z


@triton.jit
def _w4_gemv_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, stride_ym, N, K, SPLIT_K,
                    G: tl.constexpr, PRO: tl.constexpr, RESIDUAL: tl.constexpr, ATOMIC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    LATE_NORM: tl.constexpr):
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    GPB: tl.constexpr = BLOCK_K // G
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    x_row = x_ptr + m * stride_xm
    rstd = 1.0
    if PRO == 1 and not LATE_NORM:  # rsqrt(mean(x^2) + eps) over the whole row, before the K-slice
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    sq = tl.zeros([BLOCK_K // 2], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        lo, hi, s, z = _codes(w_ptr, s_ptr, z_ptr, rn, n_ok, k0, K, G, BLOCK_N, BLOCK_K)
        ke = k0 + 2 * tl.arange(0, BLOCK_K // 2)
        if LATE_NORM:  # h = x * norm_w now, times rstd at the end
            xe = tl.load(x_row + ke, mask=ke < K, other=0.0).to(tl.float32)
            xo = tl.load(x_row + ke + 1, mask=ke < K, other=0.0).to(tl.float32)
            sq += xe * xe + xo * xo
            xe = xe * tl.load(nw_ptr + ke, mask=ke < K, other=0.0).to(tl.float32)
            xo = xo * tl.load(nw_ptr + ke + 1, mask=ke < K, other=0.0).to(tl.float32)
        else:
            xe = _input(x_row, ke, ke < K, K, rstd, nw_ptr, PRO, ACT_BF16)
            xo = _input(x_row, ke + 1, ke < K, K, rstd, nw_ptr, PRO, ACT_BF16)
        xe = tl.reshape(xe, [1, GPB, G // 2])
        xo = tl.reshape(xo, [1, GPB, G // 2])
        # sum_k (q - z) s x = sum_groups s * (sum q x - z * sum x)
        qx = tl.sum(lo * xe + hi * xo, axis=2)  # [BN, GPB]
        xs = tl.sum(xe + xo, axis=2)             # [1, GPB]
        acc += tl.sum(s * (qx - z * xs), axis=1)
    if LATE_NORM:
        acc = acc / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)
    y = y_ptr + m * stride_ym + rn
    if RESIDUAL:
        if not ATOMIC:
            tl.store(y, tl.load(y, mask=n_ok, other=0.0) + acc, mask=n_ok)
        else:
            tl.atomic_add(y, acc, mask=n_ok)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _w4_gemm_kernel(x_ptr, stride_xm, nw_ptr, eps, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, stride_ym, M, N, K, SPLIT_K,
                    G: tl.constexpr, PRO: tl.constexpr, RESIDUAL: tl.constexpr, ATOMIC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF: tl.constexpr = BLOCK_K // 2
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * stride_xm  # [BM, 1]
    rstd = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    if PRO == 1:  # before the loop: h is rounded to fp16 / bf16 for tl.dot, so it must be normalized first
        ss = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1, keep_dims=True) / K + eps)  # [BM, 1]
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        lo, hi, s, z = _codes(w_ptr, s_ptr, z_ptr, rn, n_ok, k0, K, G, BLOCK_N, BLOCK_K)
        w_lo = _act(tl.reshape((lo - z[:, :, None]) * s[:, :, None], [BLOCK_N, HALF]), ACT_BF16)  # w = (q - z) * s
        w_hi = _act(tl.reshape((hi - z[:, :, None]) * s[:, :, None], [BLOCK_N, HALF]), ACT_BF16)
        ke = (k0 + 2 * tl.arange(0, HALF))[None, :]
        mask = m_ok[:, None] & (ke < K)
        xe = _input(x_rows, ke, mask, K, rstd, nw_ptr, PRO, ACT_BF16)  # [BM, BK/2]
        xo = _input(x_rows, ke + 1, mask, K, rstd, nw_ptr, PRO, ACT_BF16)
        if ACT_BF16:
            acc += tl.dot(xe.to(tl.bfloat16), tl.trans(w_lo.to(tl.bfloat16)))
            acc += tl.dot(xo.to(tl.bfloat16), tl.trans(w_hi.to(tl.bfloat16)))
        else:
            acc += tl.dot(xe.to(tl.float16), tl.trans(w_lo.to(tl.float16)))
            acc += tl.dot(xo.to(tl.float16), tl.trans(w_hi.to(tl.float16)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        if not ATOMIC:
            tl.store(y, tl.load(y, mask=mask, other=0.0) + acc, mask=mask)
        else:
            tl.atomic_add(y, acc, mask=mask)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = rn < N
    lo, hi, s, z = _codes(w_ptr, s_ptr, z_ptr, rn, n_ok, k0, K, G, BLOCK_N, BLOCK_K)
    lo = tl.reshape((lo - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_K // 2])
    hi = tl.reshape((hi - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_K // 2])
    w = tl.interleave(lo, hi)  # [BN, BK]: columns 2j, 2j+1
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * K + kk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (kk < K)[None, :])


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# Per-shape choices from bench/gpu_runtime.py --kernels-only on the H100: {(M bucket, N, K): config}.
# Shapes not listed use ``default_config``. M bucket: 1, or 16 for 2..16 rows.
TUNED: dict[tuple[int, int, int], GemvConfig] = {}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(M: int, N: int, K: int, group: int, residual: bool, sms: int = 132) -> GemvConfig:
    """BLOCK_K: 256 columns (2+ groups) per step; BLOCK_N: enough programs for two per SM; split-K (only
    with the residual epilogue, whose adds can be atomic) when N alone gives too few programs."""
    tuned = TUNED.get((1 if M <= 1 else 16, N, K))
    if tuned is not None and (tuned.split_k == 1 or residual):
        return tuned
    block_k = max(group, min(256, _pow2_at_least(K)))
    block_n = 16 if M <= 1 else 32
    if N >= 8 * sms * block_n:
        block_n *= 2
    split = 1
    if residual:
        n_blocks = -(-N // block_n)
        while n_blocks * split * 2 <= 2 * sms and K // (block_k * split * 2) >= 2:
            split *= 2
    return GemvConfig(block_n, block_k, split)


def w4_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
              out: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: bool = False,
              config: GemvConfig | None = None) -> torch.Tensor:
    """out = h(x) W^T (+ bias), or out += h(x) W^T with ``residual``; out: [M, N], x: [M, K] ([M, 2K] silu_mul)."""
    N, K = codes.shape[0], 2 * codes.shape[1]
    M = x.shape[0]
    pro = PROLOGUES[prologue]
    assert codes.dtype == torch.uint8 and codes.is_contiguous(), "codes: uint8 [N, K/2], contiguous"
    assert scales.shape == zeros.shape == (N, K // group) and scales.is_contiguous() and zeros.is_contiguous()
    assert zeros.dtype == torch.uint8, "zeros: uint8 [N, K/G]"
    assert group >= 2 and group & (group - 1) == 0 and K % group == 0, f"group {group}: a power of two dividing K"
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] == (2 * K if pro == 2 else K), f"x {tuple(x.shape)}, K={K}"
    assert out.dim() == 2 and out.shape == (M, N) and out.stride(-1) == 1, f"out {tuple(out.shape)} for [{M}, {N}]"
    assert not residual or out.dtype == torch.float32, "the residual is float32"
    assert pro != 1 or (norm_weight is not None and norm_weight.shape == (K,) and norm_weight.is_contiguous())
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous())
    act = out.dtype if not residual else (x.dtype if pro != 1 else norm_weight.dtype)
    assert act in (torch.float16, torch.bfloat16), f"activations must be fp16 or bf16, got {act}"
    cfg = config or default_config(M, N, K, group, residual)
    assert cfg.split_k == 1 or residual, "split-K needs the residual epilogue (atomic adds)"
    assert cfg.block_k % group == 0 and cfg.block_k & (cfg.block_k - 1) == 0, f"block_k {cfg.block_k} vs group {group}"
    nw = norm_weight if norm_weight is not None else scales  # unused pointer when the prologue has no norm
    b = bias if bias is not None else scales
    common = dict(G=group, PRO=pro, RESIDUAL=residual, ATOMIC=cfg.split_k > 1, HAS_BIAS=bias is not None,
                  ACT_BF16=act == torch.bfloat16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    n_blocks = triton.cdiv(N, cfg.block_n)
    if M == 1:
        _w4_gemv_kernel[(n_blocks, cfg.split_k, 1)](x, x.stride(0), nw, eps, codes, scales, zeros, b, out,
                                                    out.stride(0), N, K, cfg.split_k,
                                                    LATE_NORM=pro == 1 and cfg.split_k == 1, **common)
    else:
        block_m = min(64, max(16, _pow2_at_least(M)))
        _w4_gemm_kernel[(n_blocks, cfg.split_k, triton.cdiv(M, block_m))](
            x, x.stride(0), nw, eps, codes, scales, zeros, b, out, out.stride(0), M, N, K, cfg.split_k, BLOCK_M=block_m,
            **common)
    return out


def w4_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  out: torch.Tensor) -> torch.Tensor:
    """out [N, K] = (q - z) * s in out's dtype (prefill: then a dense matmul)."""
    N, K = codes.shape[0], 2 * codes.shape[1]
    assert codes.dtype == torch.uint8 and codes.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    assert group & (group - 1) == 0 and K % group == 0, f"group {group} must be a power of two dividing K"
    assert out.shape == (N, K) and out.is_contiguous()
    block_n, block_k = 32, max(group, 128)
    _w4_dequant_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](codes, scales, zeros, out, N, K, G=group,
                                                                           BLOCK_N=block_n, BLOCK_K=block_k)
    return out
