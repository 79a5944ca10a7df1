"""Row-wise kernels: RMSNorm of the (fp32) residual into the activation dtype, and SiLU(gate) * up.

Both round where runtime/cpu/model.py rounds: rms_norm's ``weight * (x * rstd).to(dtype)``, and
``F.silu(gate) * up`` in the activation dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl

ZERO_BLOCK = 4096  # floats zeroed per program by rms_norm(..., zero=)


@triton.jit
def _rms_norm_kernel(x_ptr, stride_x, w_ptr, out_ptr, stride_o, H, eps, z_ptr, stride_z, Z, BLOCK: tl.constexpr,
                     ZBLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, 0) normalizes the row; programs (row, p > 0) zero block p - 1 of ZBLOCK floats of z's row
    (after the wait: whatever read z before has finished)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row, p = tl.program_id(0), tl.program_id(1)
    if p > 0:
        kz = (p - 1) * ZBLOCK + tl.arange(0, ZBLOCK)
        tl.store(z_ptr + row * stride_z + kz, tl.zeros([ZBLOCK], tl.float32), mask=kz < Z)
    else:
        k = tl.arange(0, BLOCK)
        mask = k < H
        x = tl.load(x_ptr + row * stride_x + k, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)  # rsqrt(mean(x^2) + eps)
        h = (x * rstd).to(out_ptr.dtype.element_ty)
        w = tl.load(w_ptr + k, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + k, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, stride_x, out_ptr, stride_o, I, BLOCK: tl.constexpr, PAIRS: tl.constexpr,
                     PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row, blk = tl.program_id(0), tl.program_id(1)
    k = blk * BLOCK + tl.arange(0, BLOCK)
    mask = k < I
    if PAIRS:  # gate n at column 2n, up n at 2n + 1
        g = tl.load(x_ptr + row * stride_x + 2 * k, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + 2 * k + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(x_ptr + row * stride_x + k, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + I + k, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + k, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
             zero: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H] (fp32 residual or activations) -> out [T, H] = weight * (x * rsqrt(mean(x^2) + eps)).
    ``zero``: an fp32 [>= T, Z] buffer whose first T rows the same launch sets to zero (the sums the next
    kernel adds into: a decode step's w13 under split-K), in blocks of ZERO_BLOCK by programs of their own."""
    T, H = x.shape
    assert x.stride(-1) == 1 and out.stride(-1) == 1 and out.shape == (T, H), f"x {tuple(x.shape)} out {tuple(out.shape)}"
    assert weight.shape == (H,) and weight.is_contiguous()
    assert zero is None or (zero.dtype == torch.float32 and zero.shape[0] >= T and zero.stride(-1) == 1)
    if T:
        on = pdl(x)
        Z = zero.shape[1] if zero is not None else 0
        _rms_norm_kernel[(T, 1 + triton.cdiv(Z, ZERO_BLOCK))](
            x, x.stride(0), weight, out, out.stride(0), H, eps, zero if zero is not None else out,
            zero.stride(0) if zero is not None else 0, Z, BLOCK=triton.next_power_of_2(H), ZBLOCK=ZERO_BLOCK, PDL=on,
            num_warps=4 if H <= 4096 else 8, launch_pdl=on)
    return out


def silu_mul(x: torch.Tensor, out: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """x: [T, 2I] = gate | up (``pairs``: gate n, up n at columns 2n, 2n + 1) -> out [T, I] = silu(gate) * up."""
    T, I2 = x.shape
    assert x.stride(-1) == 1 and out.stride(-1) == 1 and out.shape == (T, I2 // 2), f"x {tuple(x.shape)}"
    block = 1024
    if T:
        on = pdl(x)
        _silu_mul_kernel[(T, triton.cdiv(I2 // 2, block))](x, x.stride(0), out, out.stride(0), I2 // 2, BLOCK=block,
                                                           PAIRS=pairs, PDL=on, launch_pdl=on)
    return out
