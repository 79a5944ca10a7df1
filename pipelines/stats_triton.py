"""One-pass per-channel (min, max, sum, sum|x|) on CUDA with Triton.

Torch needs three passes over the activations for these (aminmax, sum, L1 norm); this reads
them once. Checked against the torch path by bench/gpu_calibrate.py on the GPU; CPU runs and
CI use the torch path in stats.py.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:
    @triton.jit
    def _col_stats_kernel(x_ptr, out_ptr, T, C, rows_per_prog,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        # x: [T, C] row-major; out: [P, 4, C] partials (min, max, sum, abssum) of P row slices
        pid_c = tl.program_id(0)
        pid_t = tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        lo = tl.full([BLOCK_C], float("inf"), tl.float32)
        hi = tl.full([BLOCK_C], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_C], tl.float32)
        a = tl.zeros([BLOCK_C], tl.float32)
        start = pid_t * rows_per_prog
        end = tl.minimum(start + rows_per_prog, T)
        for t in range(start, end, BLOCK_T):
            rows = t + tl.arange(0, BLOCK_T)
            m = (rows[:, None] < end) & cmask[None, :]
            v = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(tl.where(m, v, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(m, v, float("-inf")), axis=0))
            s += tl.sum(v, axis=0)
            a += tl.sum(tl.abs(v), axis=0)
        base = out_ptr + pid_t * 4 * C + cols
        tl.store(base, lo, mask=cmask)
        tl.store(base + C, hi, mask=cmask)
        tl.store(base + 2 * C, s, mask=cmask)
        tl.store(base + 3 * C, a, mask=cmask)


def col_stats_cuda(x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x2: [T, C] contiguous CUDA -> (min, max, sum, abssum), each [C] float32."""
    assert x2.is_cuda and x2.dim() == 2 and x2.stride(-1) == 1 and x2.stride(0) == x2.shape[1]
    T, C = x2.shape
    block_c, block_t = 128, 32
    col_blocks = triton.cdiv(C, block_c)
    sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
    slices = max(1, min(triton.cdiv(T, block_t), (4 * sms) // col_blocks))
    rows_per_prog = triton.cdiv(triton.cdiv(T, slices), block_t) * block_t
    slices = triton.cdiv(T, rows_per_prog)
    part = torch.empty(slices, 4, C, device=x2.device, dtype=torch.float32)
    _col_stats_kernel[(col_blocks, slices)](x2, part, T, C, rows_per_prog, BLOCK_T=block_t, BLOCK_C=block_c,
                                            num_warps=4)
    return part[:, 0].amin(0), part[:, 1].amax(0), part[:, 2].sum(0), part[:, 3].sum(0)


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda
