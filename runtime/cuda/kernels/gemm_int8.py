"""int8 weights (one scale per output row) times a few rows: the LM head of the decode path.

    y[m, n] = s[n] * sum_k x[m, k] q[n, k]        q int8 [N, K] row-major, s float32 [N], x fp16/bf16 [M, K]

One tl.dot kernel for every M (one row padded to 16): the head is a wide matrix (N ~ 150k for Qwen2), so
even one row gives thousands of programs and the kernel streams weights through cp.async pipelines. int8
codes become the activation dtype without a conversion instruction for fp16: (q + 128) | 0x6400 read as fp16
is exactly 1152 + q (attention.py's _int8_as), and the row sums of x (accumulated in the same loop) take the
1152 back out: sum_k x (1152 + q) - 1152 sum_k x. bf16 converts (exact for |q| <= 128).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import INTERPRET, pdl
from .attention import _int8_as


@dataclass(frozen=True)
class Int8Config:
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


# a large-vocabulary head at one row, timed in the decode step: 128 outputs per program, at least as fast as 64
TUNED_INT8 = Int8Config(128, 128, 4, 4)
# Triton's interpreter runs programs one after another: wide tiles, few programs (the GPU-path tests on the CPU)
INTERPRETER_INT8 = Int8Config(4096, 128)
SWEEP_INT8 = [Int8Config(bn, bk, w, st) for bn, bk, w, st in
              ((64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 256, 8, 3), (32, 256, 4, 4), (256, 64, 8, 4),
               (128, 64, 4, 6), (64, 128, 4, 6))]


@triton.jit
def _w8_kernel(x_ptr, stride_xm, c_ptr, stride_c, s_ptr, y_ptr, stride_ym, M, N, K, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    xs = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(c_ptr + rn[:, None] * stride_c + (k0 + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc = tl.dot(x, tl.trans(_int8_as(q, dt)), acc)
        if dt == tl.float16:
            xs += tl.sum(x.to(tl.float32), axis=1)
    if dt == tl.float16:
        acc -= 1152.0 * xs[:, None]
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], (acc * s[None, :]).to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def w8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
              config: Int8Config | None = None) -> torch.Tensor:
    """out [M, N] = (x @ codes^T) * scales, x [M, K] fp16/bf16, codes int8 [N, K], scales float32 [N]."""
    M, K = x.shape
    N = codes.shape[0]
    assert codes.dtype == torch.int8 and codes.shape[1] == K and codes.stride(-1) == 1, "codes: int8 [N, K]"
    assert scales.shape == (N,) and scales.dtype == torch.float32 and scales.is_contiguous()
    assert x.dtype in (torch.float16, torch.bfloat16) and x.stride(-1) == 1
    assert out.shape == (M, N) and out.stride(-1) == 1
    cfg = config or (INTERPRETER_INT8 if INTERPRET else TUNED_INT8)
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    on = pdl(x)
    _w8_kernel[(triton.cdiv(N, cfg.block_n), triton.cdiv(M, block_m))](
        x, x.stride(0), codes, codes.stride(0), scales, out, out.stride(0), M, N, K, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=on, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        launch_pdl=on)
    return out
