"""The HF AWQ checkpoint (AutoAWQ GEMM format) and qconv's int8 weight-only variant: write and read back.

4-bit (quant_method "awq", version "gemm"; transformers and vLLM load it):
  <linear>.qweight  int32 [in, out/8]   AWQ nibble order [0, 2, 4, 6, 1, 3, 5, 7]
  <linear>.qzeros   int32 [in/g, out/8] same packing
  <linear>.scales   fp16  [in/g, out]
8-bit (quant_method "qconv_w8", symmetric; qconv's own, read by qconv convert/eval):
  <linear>.qweight  int8  [out, in]
  <linear>.scales   fp16  [out, in/g]
Everything else (embeddings, norms, biases, lm_head) is fp16.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import QconvError
from .fileio import load_tensors, save_json
from .quant import awq_pack, awq_unpack, dequantize, group_qparams, quantize

W8_METHOD = "qconv_w8"


def quantize_linear(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    """Quantize one (already scaled and clipped) weight [out, in] into checkpoint tensors.

    The codes are computed against the fp16-rounded scale that is stored, so dequantizing the
    checkpoint gives exactly what the codes were chosen for.
    """
    scale, zero = group_qparams(w, bits, group_size, sym)
    scale = scale.half().float()
    q = quantize(w, scale, zero, bits, sym)
    if bits == 4:
        if sym:  # the GEMM format always has zero points: shift signed codes by 8, zero = 8
            q, zero = q + 8, torch.full_like(zero, 8.0)
        return awq_pack(q, scale, zero)
    return {"qweight": q.to(torch.int8), "scales": scale.half()}


def quantization_config(bits: int, group_size: int, sym: bool) -> dict:
    if bits == 4:
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    return {"quant_method": W8_METHOD, "bits": 8, "group_size": group_size, "sym": True}


def write_checkpoint_files(folder: Path, config, qcfg: dict, tokenizer, report: dict) -> None:
    """Everything but the weights (which a ShardWriter streams into ``folder``, a fresh temp dir from
    atomic_dir): config, tokenizer, generation config, awq.json."""
    cfg = config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer.save_pretrained(folder)
    gen = getattr(config, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    save_json(report, folder / "awq.json")


def is_quantized_checkpoint(folder: Path) -> dict | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    q = cfg.get("quantization_config") or {}
    return q if q.get("quant_method") in ("awq", W8_METHOD) else None


def dequantize_linear(qcfg: dict, qweight: torch.Tensor, qzeros, scales: torch.Tensor) -> torch.Tensor:
    """A checkpoint linear's float32 weight [out, in] from its stored tensors (``qzeros`` None for int8)."""
    if qcfg["quant_method"] == "awq":
        if str(qcfg.get("version", "gemm")).lower() != "gemm" or qcfg.get("bits") != 4:
            raise QconvError(f"only 4-bit AWQ GEMM checkpoints are supported, got {qcfg}")
        q, scale, zero = awq_unpack(qweight, qzeros, scales)
    else:  # int8, symmetric: w = q * s
        q, scale = qweight.to(torch.int32), scales.float()
        zero = torch.zeros_like(scale)
    return dequantize(q, scale, zero)


def dequantized_state_dict(folder: Path, qcfg: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint and return a plain float state dict (``<linear>.weight`` rebuilt)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QconvError(f"{folder} has no .safetensors weights")
    raw = {}
    for f in files:
        raw.update(load_tensors(f, "checkpoint weights"))
    out = {}
    for name, t in raw.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            out[f"{base}.weight"] = dequantize_linear(qcfg, t, raw.get(f"{base}.qzeros"), raw[f"{base}.scales"]).to(dtype)
        elif not name.endswith((".qzeros", ".scales")):
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out
