"""Reading a source checkpoint tensor by tensor: fp16/bf16/fp32 HF, AutoAWQ GEMM, GPTQ int4, or qconv's
int8 weight-only checkpoint (``qconv awq --w-bits 8``, quant_method qconv_w8; see convert/awq_export.py).

Nothing is loaded through transformers' modeling code: tensors are read lazily from the folder's
safetensors files by the names in the architecture table, so a layer at a time sits in memory.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import QconvError
from .awq_export import W8_METHOD
from .layout import QuantLinear
from .quant import awq_unpack, gptq_unpack
from .shards import ShardSet

FORMATS = ("hf", "awq", "gptq", "w8")
_METHODS = {"awq": "awq", "gptq": "gptq", W8_METHOD: "w8"}  # quantization_config.quant_method -> format


def detect_format(raw_config: dict) -> str:
    """'hf' without a quantization_config; 'awq' / 'gptq' from its quant_method."""
    qc = raw_config.get("quantization_config")
    if not qc:
        return "hf"
    method = str(qc.get("quant_method", "")).lower()
    if method not in _METHODS:
        raise QconvError(f"quantization_config.quant_method {method!r} is not supported; qconv convert reads "
                         f"fp16/bf16/fp32 HF weights, AutoAWQ GEMM, GPTQ int4 and qconv's int8 ({W8_METHOD})")
    return _METHODS[method]


def quant_group_size(raw_config: dict, fmt: str) -> int:
    """Check the checkpoint's quantization_config fits what we read; return its group size (0: per channel)."""
    qc = raw_config.get("quantization_config") or {}
    method = str(qc.get("quant_method", "none")).lower()
    if _METHODS.get(method) != fmt:
        raise QconvError(f"--model-format {fmt} does not match this checkpoint, whose quantization_config has "
                         f"quant_method {method!r}")
    bits, want = qc.get("bits", qc.get("w_bit")), 8 if fmt == "w8" else 4
    if bits != want:
        raise QconvError(f"only {want}-bit {fmt.upper()} checkpoints are supported, this one has bits={bits}")
    if fmt == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or not qc.get("zero_point", True):
            raise QconvError(f"only AutoAWQ GEMM with zero point is supported, this one has version={version!r} "
                             f"zero_point={qc.get('zero_point')}")
    group = qc.get("group_size", qc.get("q_group_size"))
    if fmt == "w8" and group == -1:
        return 0
    if not isinstance(group, int) or group <= 0:
        raise QconvError(f"the checkpoint's quantization_config has group_size={group!r}; per-channel "
                         f"(-1) and missing group sizes are not supported")
    return group


class Checkpoint:
    """Lazy, read-only view of the tensors in an HF folder's ``*.safetensors`` files."""

    def __init__(self, folder: Path, fmt: str):
        self.folder, self.fmt = Path(folder), fmt
        self.shards = ShardSet(self.folder)

    def __contains__(self, name: str) -> bool:
        return name in self.shards

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shards:
            raise QconvError(f"the checkpoint in {self.folder} has no tensor {name!r}; is it a complete "
                             f"{self.fmt} checkpoint of this architecture?")
        return self.shards.read(name)

    def linear(self, prefix: str, out_f: int, in_f: int) -> torch.Tensor | QuantLinear:
        """The linear at ``prefix``: a float weight [out, in], or its int4 codes and qparams."""
        if f"{prefix}.qweight" not in self:
            w = self.get(f"{prefix}.weight")
            self._check(prefix, tuple(w.shape), out_f, in_f)
            return w
        if self.fmt == "hf":
            raise QconvError(f"{prefix} is quantized (qweight) but the config has no quantization_config; "
                             f"pass --model-format awq or gptq")
        if self.fmt == "awq":
            q, scale, zero = awq_unpack(*self._packed(prefix))  # qweight [in, out/8] -> codes [out, in]
        elif self.fmt == "w8":  # qweight int8 [out, in], scales [out, in/g]; symmetric: w = q * s
            q, scale = self.get(f"{prefix}.qweight").to(torch.int32), self.get(f"{prefix}.scales").float()
            zero = torch.zeros_like(scale)
        else:
            q, scale, zero = gptq_unpack(*self._packed(prefix))  # qweight [in/8, out] -> codes [out, in]
            self._check_g_idx(prefix, in_f, in_f // scale.shape[1])
        self._check(prefix, tuple(q.shape), out_f, in_f)
        return QuantLinear(q, scale, zero)

    def _packed(self, prefix: str) -> tuple[torch.Tensor, ...]:
        return self.get(f"{prefix}.qweight"), self.get(f"{prefix}.qzeros"), self.get(f"{prefix}.scales")

    def bias(self, prefix: str) -> torch.Tensor | None:
        return self.get(f"{prefix}.bias") if f"{prefix}.bias" in self else None

    def _check_g_idx(self, prefix: str, in_f: int, group: int) -> None:
        # GPTQ act-order stores a permuted group index; only the trivial one (i // g) is supported.
        name = f"{prefix}.g_idx"
        if name in self:
            g_idx = self.get(name).to(torch.int64)
            if not torch.equal(g_idx, torch.arange(in_f) // group):
                raise QconvError(f"{name} is not trivial (GPTQ act-order / desc_act); such checkpoints are "
                                 f"not supported, re-quantize with desc_act=False")

    def _check(self, prefix: str, shape: tuple, out_f: int, in_f: int) -> None:
        if shape != (out_f, in_f):
            where = self.shards.file_of(f"{prefix}.qweight" if f"{prefix}.qweight" in self else f"{prefix}.weight")
            raise QconvError(f"{where}: {prefix} has shape {list(shape)} (as [out, in]) but config.json implies "
                             f"[{out_f}, {in_f}]; the weights do not match the config")
