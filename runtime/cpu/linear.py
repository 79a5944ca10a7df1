"""The runtime's linears: dense, or int4 through torch's CPU int4 kernel.

torch's int4 kernel decodes about twice as fast as dense weights, but only with bf16 activations (with fp32
it is far slower than dense; bench/RESULTS.md has the speeds), so int4 weights use it when the compute dtype
is bf16 on CPU (``--dtype bfloat16``) and the shapes allow;
otherwise they are dequantized once at load (w = (q - z) * s) and give exactly the dequantized model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...convert.layout import QuantLinear

KERNEL_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 2


class Linear(nn.Module):
    """y = x W^T + b; W: [out, in] dense in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Int4Linear(nn.Module):
    """torch's CPU int4 matmul (tinygemm-style layout), bf16 activations.

    The kernel computes w = (q - 8) * s + zf, so our zero point z becomes zf = (8 - z) * s:
    (q - 8) * s + (8 - z) * s = (q - z) * s.
    """

    def __init__(self, w: QuantLinear, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        out_f, in_f = w.codes.shape
        self.group, self.out_f = in_f // w.scale.shape[1], out_f
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(w.codes.contiguous(), INNER_K_TILES))
        # scales_and_zeros: [in/g, out, 2] = (s, (8 - z) * s)
        sz = torch.stack([w.scale.t(), ((8 - w.zero) * w.scale).t()], dim=-1)
        self.register_buffer("scales_and_zeros", sz.contiguous().to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @staticmethod
    def fits(w: QuantLinear, device: torch.device, dtype: torch.dtype) -> bool:
        out_f, in_f = w.codes.shape
        return (device.type == "cpu" and dtype == torch.bfloat16 and out_f % 16 == 0
                and in_f // w.scale.shape[1] in KERNEL_GROUPS and hasattr(torch, "_weight_int4pack_mm_for_cpu"))

    def forward(self, x):
        shape = x.shape  # [..., in] -> [N, in] -> [N, out] -> [..., out]
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), self.packed, self.group,
                                              self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_f)
        return y if self.bias is None else y + self.bias


def make_linear(w: torch.Tensor | QuantLinear, bias: torch.Tensor | None, weight_type: str, device: torch.device,
                dtype: torch.dtype) -> nn.Module:
    """A dense weight, or quantized codes: int4 through the kernel where it fits, else dequantized once."""
    if isinstance(w, QuantLinear):
        if weight_type == "int4" and Int4Linear.fits(w, device, dtype):
            return Int4Linear(w, bias, dtype)
        w = w.dequantize()  # w = (q - z) * s, float32 [out, in]
    return Linear(w.to(device, dtype), None if bias is None else bias.to(device, dtype))
