"""The host side of the int4 kernels: w4_matmul checks the shapes and dispatches a GemvConfig (tuning.py) to the
CUDA-core or tl.dot kernel (gemv_int4.py), the tensor-core kernel (w4_tc.py) or the mma.sync kernel (mma_int4.py,
Gluon; where it cannot run, the tensor-core kernel takes its configs); w4_dequantize for prefill.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton

from . import INTERPRET, pdl
from .gemv_int4 import _w4_dequant_kernel, _w4_gemm_kernel, _w4_gemv_kernel
from .norm import silu_mul
from .tuning import GemvConfig, misfit, rule
from .w4_tc import _w4_tc_kernel
from ....convert.layout import word_strides

try:  # Gluon (Triton 3.4 - 3.6): the mma.sync kernel; without it, or where its experimental API has moved (an
    # attribute or signature its module-level layouts and jits rely on), the tensor-core kernel takes its configs
    from . import mma_int4
    HAVE_MMA = True
except (ImportError, AttributeError, TypeError):
    HAVE_MMA = False


PROLOGUES = {"none": 0, "rmsnorm": 1, "silu": 2}
EPILOGUES = {"store": 0, "residual": 1, "silu": 2}


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
