"""Linears of the GPU path: int4 codes as int32 words (convert/layout.pack_words, then group_major: built at load
from the workspace's uint8 codes), or a dense weight. w13 arrives with gate/up rows interleaved in pairs
(convert/layout.interleave_pairs, done by the loader), so its outputs are pairs too.

    lin(x)                       any number of rows (prefill): int4 is dequantized into a scratch buffer
                                 shared by the model's linears, w = (q - z) * s, then cuBLAS; a few rows
                                 (<= TRITON_MAX_ROWS) go through the Triton kernel instead
    lin.run(x, out, prologue=, epilogue=)
                                 a decode step: out = h(x) W^T + b, out += h(x) W^T (the fp32 residual),
                                 or out = silu(gate) * up of the pairs, with h = x or RMSNorm(x)
                                 (kernels/w4_matmul.py)

How a decode step multiplies (``DECODE_BACKEND``; int4 "triton" uses the config kernels/tuning.py picks):
  int4  "triton":   one fused kernel (prologue, int4 GEMV/GEMM with split-K, epilogue)
        "tinygemm": torch's _weight_int4pack_mm (bf16 activations), with separate prologue/epilogue kernels
        "dequant":  dequantize + cuBLAS (the reference; moves 4x the bytes of int4)
  dense "cublas":   F.linear, with separate prologue/epilogue kernels
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...convert.layout import QuantLinear, group_major, pack_int4, pack_words, rows_major, unpack_int4, unpack_words
from .kernels.gemm_int8 import w8_matmul
from .kernels.w4_matmul import w4_dequantize, w4_matmul
from .kernels.norm import rms_norm, silu_mul
from .kernels.tuning import GemvConfig, config_for

DECODE_BACKEND = {"int4": "triton", "dense": "cublas"}
TRITON_MAX_ROWS = 64  # prefill rows up to this go through the int4 kernel (it reads the int4 weights once)
# rather than dequantize + cuBLAS (which writes and reads an fp16 copy of each weight)
TINYGEMM_GROUPS = (32, 64, 128, 256)


class DequantScratch:
    """One [N, K] buffer in the compute dtype, grown to the largest int4 linear, reused by every linear
    of a model in stream order (prefill dequantizes one weight at a time)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.buf = torch.empty(0, device=device, dtype=dtype)

    def get(self, n: int, k: int) -> torch.Tensor:
        if self.buf.numel() < n * k:
            self.buf = torch.empty(n * k, device=self.device, dtype=self.dtype)
        return self.buf[:n * k].view(n, k)


class GpuLinear(nn.Module):
    def __init__(self, w: torch.Tensor | QuantLinear, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype, scratch: DequantScratch, sms: int = 132, int4: bool = True,
                 gpu: str | None = None):
        super().__init__()
        # gpu: torch.cuda.get_device_name() of the device (None: no GPU), whose table kernels/tuning.py reads
        self.dtype, self.scratch, self.sms, self.gpu = dtype, scratch, sms, gpu
        self.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)
        for name in ("words", "scales", "zeros"):  # int4: words int32 [K/G, N, G/8] (group-major), scales fp16 /
            # zeros uint8 [N, K/G]
            self.register_buffer(name, None)
        self.weight = None                          # dense: [N, K] in the compute dtype
        out_f, in_f = (w.codes if isinstance(w, QuantLinear) else w).shape
        self.out_features, self.in_features = out_f, in_f
        group = in_f // w.scale.shape[1] if isinstance(w, QuantLinear) else 0
        if int4 and isinstance(w, QuantLinear) and fits_int4_kernel(w):
            self.group = group
            self.words = group_major(pack_words(w.codes.to(device), group), group)
            self.scales = w.scale.to(device, torch.float16)
            self.zeros = w.zero.round().to(device, torch.uint8)
            self.backend = DECODE_BACKEND["int4"]
        else:  # dense, or int codes the kernel does not take (dequantized once: w = (q - z) * s)
            dense = w.dequantize() if isinstance(w, QuantLinear) else w
            self.group = 0
            self.weight = nn.Parameter(dense.to(device, dtype), requires_grad=False)
            self.backend = DECODE_BACKEND["dense"]
        self.config: GemvConfig | None = None  # None: kernels/tuning.config_for per call
        self._tiny = None

    @property
    def int4(self) -> bool:
        return self.words is not None

    def nbytes(self) -> int:
        ts = [self.words, self.scales, self.zeros, self.weight, self.bias]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in the compute dtype."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not self.int4:
            y = F.linear(x2, self.weight, self.bias)
        elif x2.shape[0] <= TRITON_MAX_ROWS:
            y = torch.empty(x2.shape[0], self.out_features, device=x.device, dtype=self.dtype)
            # the table or the rule: self.config is a decode step's (it may split K, which storing cannot)
            cfg = config_for(self.gpu, x2.shape[0], self.out_features, self.in_features, self.group, sms=self.sms)
            w4_matmul(x2.contiguous(), self.words, self.scales, self.zeros, self.group, y, bias=self.bias, config=cfg)
        else:
            y = F.linear(x2, self.dequantized(), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The int4 weight as [N, K] in the compute dtype, in the shared scratch buffer (valid until the
        next linear dequantizes)."""
        w = self.scratch.get(self.out_features, self.in_features)
        return w4_dequantize(self.words, self.scales, self.zeros, self.group, w)

    def kernel_config(self, rows: int, epilogue: str = "store", prologue: str = "none") -> GemvConfig:
        """The int4 kernel's config for ``rows`` rows: ``self.config``, else this GPU's table or the rule for
        shapes without an entry (kernels/tuning.config_for)."""
        return self.config or config_for(self.gpu, rows, self.out_features, self.in_features, self.group, epilogue,
                                         prologue, self.sms)

    def accumulates(self, rows: int) -> bool:
        """Whether a decode step of ``rows`` should add split-K partial sums into an fp32 buffer (``run`` with
        epilogue="residual") rather than store: when the config for the shape with that epilogue behind its RMSNorm
        (qkv's and w13's; this GPU's table entry, or the rule) splits K."""
        if not (self.int4 and self.backend == "triton"):
            return False
        return self.kernel_config(rows, "residual", "rmsnorm").split_k > 1

    def run(self, x: torch.Tensor, out: torch.Tensor, prologue: str = "none", norm_weight: torch.Tensor | None = None,
            eps: float = 0.0, epilogue: str = "store", sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """A decode step: out = h(x) W^T (+ b); out += h(x) W^T (``epilogue="residual"``, out fp32); out = h(x) W^T
        in fp32 (``"accumulate"``: out is zeroed, by the norm kernel where one runs, and the K-slices add into it);
        or out = silu(y[:, 0::2]) * y[:, 1::2] (``"silu"``, the pair-interleaved w13: out [M, N/2]; ``sums``: the
        zeroed buffers a split-K config adds into, kernels/w4_matmul.sum_buffers). h = x, RMSNorm(x), or
        (``prologue="silu"``) silu(x[:, 0::2]) * x[:, 1::2] of w13's accumulated fp32 sums."""
        fused = self.int4 and self.backend == "triton"
        accumulate = epilogue == "accumulate"
        epilogue = "residual" if accumulate else epilogue
        cfg = None
        if fused:
            cfg = self.kernel_config(x.shape[0], epilogue, prologue)
        zeroed = False
        if prologue == "rmsnorm" and not (fused and (not cfg.dot or cfg.fuse_norm)):
            # a norm kernel first: for the other backends, and before the tl.dot kernels, where a plain GEMM after it
            # is faster than the GEMM's fused prologue (which reads each row twice); the GEMV keeps its fused norm,
            # and so do configs that ask for it (fuse_norm)
            x = rms_norm(x, norm_weight, eps, torch.empty(x.shape, device=x.device, dtype=self.dtype),
                         zero=out if accumulate else None)
            prologue, zeroed = "none", accumulate
            if fused:
                cfg = self.kernel_config(x.shape[0], epilogue)
        if accumulate and not zeroed:
            out.zero_()
        if fused:
            w4_matmul(x, self.words, self.scales, self.zeros, self.group, out, bias=self.bias, prologue=prologue,
                      norm_weight=norm_weight, eps=eps, epilogue=epilogue, config=cfg, sums=sums, dtype=self.dtype)
            return
        h = x
        if prologue == "silu":
            h = silu_mul(x, torch.empty(x.shape[0], self.in_features, device=x.device, dtype=self.dtype), pairs=True)
        if epilogue == "store" and not self.int4 and out.dtype == self.dtype:  # cuBLAS writes out directly
            if self.bias is None:
                torch.mm(h, self.weight.t(), out=out)
            else:
                torch.addmm(self.bias, h, self.weight.t(), out=out)
            return
        y = self.matmul(h)
        if epilogue == "residual":
            out.add_(y)
        elif epilogue == "silu":
            silu_mul(y, out, pairs=True)
        else:
            out.copy_(y)

    def matmul(self, h: torch.Tensor) -> torch.Tensor:
        """h W^T + b through this linear's decode backend (no fused prologue or epilogue)."""
        if not self.int4:
            return F.linear(h, self.weight, self.bias)
        if self.backend == "tinygemm":
            packed, sz = self.tinygemm()
            y = torch.ops.aten._weight_int4pack_mm(h.to(torch.bfloat16), packed, self.group, sz).to(self.dtype)
            return y if self.bias is None else y + self.bias
        if self.backend == "dequant":
            return F.linear(h, self.dequantized(), self.bias)
        y = torch.empty(h.shape[0], self.out_features, device=h.device, dtype=self.dtype)
        return w4_matmul(h, self.words, self.scales, self.zeros, self.group, y, bias=self.bias,
                         config=self.kernel_config(h.shape[0]))

    def tinygemm(self, swap_nibbles: bool = True, inner_k_tiles: int | None = None):
        """(packed, scales_and_zeros) for torch.ops.aten._weight_int4pack_mm, built once."""
        if self._tiny is None:
            codes = pack_int4(unpack_words(rows_major(self.words), self.group))
            self._tiny = tinygemm_pack(codes, self.scales, self.zeros, swap_nibbles, inner_k_tiles)
        return self._tiny


class Int8Head(nn.Module):
    """The output projection as int8 codes with one scale per vocabulary row (kernels/gemm_int8.py): half the
    bytes of the fp16 head, the largest matrix a decode step of a small model reads. Same interface as
    GpuLinear where the model uses it: ``head(x)`` and ``head.run(x, out, prologue="rmsnorm", ...)``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        assert codes.dtype == torch.int8 and scales.shape == (codes.shape[0],)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.dtype = dtype
        self.out_features, self.in_features = codes.shape
        self.config = None  # None: gemm_int8.TUNED_INT8

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scales.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(x2.shape[0], self.out_features, device=x.device, dtype=self.dtype)
        return w8_matmul(x2, self.codes, self.scales, y, self.config).reshape(*x.shape[:-1], self.out_features)

    def run(self, x: torch.Tensor, out: torch.Tensor, prologue: str = "none", norm_weight: torch.Tensor | None = None,
            eps: float = 0.0, epilogue: str = "store") -> None:
        """A decode step: out = h(x) W^T, h = x or RMSNorm(x) (its own kernel)."""
        assert epilogue == "store", "the int8 head only stores"
        h = x
        if prologue == "rmsnorm":
            h = rms_norm(x, norm_weight, eps, torch.empty(x.shape, device=x.device, dtype=self.dtype))
        w8_matmul(h, self.codes, self.scales, out, self.config)


# ----------------------------------------------------------------------------------------------
def fits_int4_kernel(w: QuantLinear) -> bool:
    """int4 codes (0..15) whose group is a power of two >= 32 dividing K."""
    out_f, in_f = w.codes.shape
    group = in_f // w.scale.shape[1]
    return group >= 32 and group & (group - 1) == 0 and in_f % group == 0


def fits_tinygemm(lin: GpuLinear) -> bool:
    return lin.int4 and lin.out_features % 8 == 0 and lin.group in TINYGEMM_GROUPS and lin.in_features % 32 == 0


def tinygemm_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, swap_nibbles: bool = True,
                  inner_k_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Our codes (uint8 [N, K/2], low nibble = column 2j) -> torch's tinygemm layout.

    torch >= 2.5 takes uint8 [N, K/2] with the HIGH nibble = column 2j (``swap_nibbles``); older torch
    took int32 [N, K] codes. The kernel computes w = (q - 8) * s + zf, so zf = (8 - z) * s gives
    (q - z) * s; scales_and_zeros: bf16 [K/G, N, 2] = (s, zf).
    """
    K = 2 * codes.shape[1]
    tiles = inner_k_tiles or next(t for t in (8, 4, 2) if K % (t * 16) == 0)
    src = ((codes & 0xF) << 4) | (codes >> 4) if swap_nibbles else codes
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(src.contiguous(), tiles)
    except RuntimeError:  # torch < 2.5: int32 codes [N, K]
        packed = torch.ops.aten._convert_weight_to_int4pack(unpack_int4(codes).contiguous(), tiles)
    s = scales.float()
    sz = torch.stack([s.t(), ((8 - zeros.float()) * s).t()], dim=-1)  # [K/G, N, 2]
    return packed, sz.to(torch.bfloat16).contiguous()


def make_gpu_linear(w: torch.Tensor | QuantLinear, bias: torch.Tensor | None, weight_type: str, device: torch.device,
                    dtype: torch.dtype, scratch: DequantScratch, sms: int, gpu: str | None = None) -> GpuLinear:
    """int4 codes stay int4 on the device; int8 codes and float weights become dense. ``gpu``: the device's
    torch.cuda.get_device_name(), which picks the kernel config table (None: the rule alone)."""
    return GpuLinear(w, bias, device, dtype, scratch, sms, int4=weight_type == "int4", gpu=gpu)
