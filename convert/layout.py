"""The runtime's weight layout: the one definition, written by ``convert/`` and read by ``runtime/``.

Tensor names in ``weights/`` (safetensors):

  global.safetensors
    tok_embeddings.weight            [vocab, hidden]
    norm.weight                      [hidden]
    output.weight                    [vocab, hidden]         (absent when tie_word_embeddings)
  layers.{i}.safetensors
    attention_norm.weight            [hidden]
    ffn_norm.weight                  [hidden]
    attention.q_norm.weight          [head_dim]              (only when the arch has q/k norm)
    attention.k_norm.weight          [head_dim]
    attention.wqkv.*                 q, k, v fused along out: [(head_num + 2 * kv_head_num) * head_dim, hidden]
    attention.wqkv.bias              [(head_num + 2 * kv_head_num) * head_dim]   (only when attn_bias)
    attention.wo.*                   [hidden, head_num * head_dim]
    feed_forward.w13.*               gate, up fused along out: [2 * inter, hidden]
    feed_forward.w2.*                [hidden, inter]

Inside a layer file names drop the ``layers.{i}.`` prefix. Each linear ``*`` is stored one of three ways;
``weight_type`` in config.ini says which the quantized ones are:

  float   .weight   [out, in]       fp32 / fp16 / bf16
  int4    .qweight  uint8 [out, in/2]  two codes per byte along ``in``: low nibble = column 2j, high = 2j+1
          .scales   fp16  [out, in/g]
          .zeros    uint8 [out, in/g]  integer zero points 0..15;  w = (q - z) * s
  int8    .qweight  int8  [out, in]    symmetric
          .scales   fp16  [out, in/g]  (group_size 0: per output channel, [out, 1]);  w = q * s

A linear that the source checkpoint left unquantized (``modules_to_not_convert``) is stored as float even
in an int4 workspace; a fused group is quantized only when all its members are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import dequantize

GLOBAL_FILE = "global.safetensors"
EMBED, FINAL_NORM, OUTPUT = "tok_embeddings.weight", "norm.weight", "output.weight"
ATTN_NORM, FFN_NORM = "attention_norm.weight", "ffn_norm.weight"
Q_NORM, K_NORM = "attention.q_norm.weight", "attention.k_norm.weight"

# Runtime linear -> the ArchSpec attributes fused into it, in order (concatenated along out).
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "attention.wqkv": ("q_proj", "k_proj", "v_proj"),
    "attention.wo": ("o_proj",),
    "feed_forward.w13": ("gate_proj", "up_proj"),
    "feed_forward.w2": ("down_proj",),
}

WEIGHT_TYPES = ("fp32", "fp16", "bf16", "int8", "int4")
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def layer_file(i: int) -> str:
    return f"layers.{i}.safetensors"


@dataclass(slots=True)
class QuantLinear:
    """Integer codes of one linear in the source's terms: codes [out, in], scale/zero [out, in/g] (float)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero)  # w = (q - z) * s, [out, in] float32


# ----------------------------------------------------------------------------------------------
# int4: two codes per byte along ``in``
# ----------------------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [out, in] in 0..15 -> uint8 [out, in/2]; byte j = codes[:, 2j] | codes[:, 2j+1] << 4."""
    out_f, in_f = codes.shape
    assert in_f % 2 == 0, f"int4 packing needs an even in_features, got {in_f}"
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15, "int4 codes must lie in 0..15"
    c = codes.to(torch.uint8).reshape(out_f, in_f // 2, 2)  # [out, in] -> [out, in/2, 2]
    return c[..., 0] | (c[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int32 codes [out, in] (inverse of ``pack_int4``)."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)  # [out, in/2, 2] -> [out, in]


def pack_words(codes: torch.Tensor, group: int) -> torch.Tensor:
    """codes [out, in] in 0..15 -> the GPU runtime's int32 words [out, in/8]: word w (0 .. g/8 - 1) of group j
    holds in bits 4i .. 4i+3 the code of column j*g + i*g/8 + w (runtime/cuda/kernels/gemv_int4.py says why)."""
    out_f, in_f = codes.shape
    assert group % 8 == 0 and in_f % group == 0, f"group {group} must be a multiple of 8 dividing {in_f}"
    c = codes.to(torch.int32).reshape(out_f, in_f // group, 8, group // 8)  # [out, groups, nibble i, word w]
    w = torch.zeros(out_f, in_f // group, group // 8, dtype=torch.int32, device=codes.device)
    for i in range(8):
        w |= c[:, :, i, :] << (4 * i)  # int32 wraps: nibble 7 lands in the sign bit, as the kernel expects
    return w.reshape(out_f, in_f // 8)


def unpack_words(words: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of ``pack_words``: int32 [out, in/8] -> int32 codes [out, in]."""
    out_f, n = words.shape
    w = words.reshape(out_f, n * 8 // group, 1, group // 8)
    shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int32)[None, None, :, None]
    return ((w >> shifts) & 0xF).reshape(out_f, n * 8)


def group_major(words: torch.Tensor, group: int) -> torch.Tensor:
    """Row-major words [out, in/8] -> group-major [in/g, out, g/8]: one group of every row contiguous, so a GPU
    program's rows of one group are one stretch of memory rather than 2g/8-byte pieces a row apart (the GPU
    runtime's layout: its int4 kernels read it faster than row-major words)."""
    out_f, n = words.shape
    return words.reshape(out_f, n * 8 // group, group // 8).transpose(0, 1).contiguous()


def rows_major(words: torch.Tensor) -> torch.Tensor:
    """Either layout of words -> row-major [out, in/8] (``pack_words``'s)."""
    return words if words.dim() == 2 else words.transpose(0, 1).reshape(words.shape[1], -1)


def word_strides(words: torch.Tensor, group: int) -> tuple[int, int, int, int]:
    """(N, K, words from one row to the next, words from one group of a row to the next) of int32 words in
    either layout: rows [N, K/8] (pack_words) or group-major [K/G, N, G/8] (group_major,
    the runtime's: a group of all rows is contiguous)."""
    assert words.dtype == torch.int32 and words.stride(-1) == 1, "words: int32 (pack_words)"
    if words.dim() == 3:
        assert words.shape[2] == group // 8, f"group-major words [K/G, N, G/8], group {group}: {tuple(words.shape)}"
        return words.shape[1], group * words.shape[0], words.stride(1), words.stride(0)
    assert words.dim() == 2, f"words: [N, K/8] or [K/G, N, G/8], got {tuple(words.shape)}"
    return words.shape[0], 8 * words.shape[1], words.stride(0), group // 8


def interleave_pairs(w: torch.Tensor | QuantLinear) -> torch.Tensor | QuantLinear:
    """gate | up fused along out [2I, ...] -> rows 2n = gate n, 2n + 1 = up n: the order the GPU kernels'
    SiLU-mul epilogue reads (runtime/cuda/kernels/gemv_int4.py, norm.silu_mul with pairs=True)."""
    def perm(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[0] // 2
        return torch.stack([t[:half], t[half:]], dim=1).reshape(t.shape)
    if isinstance(w, QuantLinear):
        return QuantLinear(perm(w.codes), perm(w.scale), perm(w.zero))
    return perm(w)


def int4_tensors(q: QuantLinear) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for one int4 linear in the runtime layout."""
    assert int(q.zero.min()) >= 0 and int(q.zero.max()) <= 15, "int4 zero points must lie in 0..15"
    return {"qweight": pack_int4(q.codes), "scales": q.scale.to(torch.float16),
            "zeros": q.zero.round().to(torch.uint8)}


def int8_tensors(q: QuantLinear) -> dict[str, torch.Tensor]:
    assert not q.zero.any(), "int8 weights are symmetric"
    return {"qweight": q.codes.to(torch.int8), "scales": q.scale.to(torch.float16)}


def read_int4(t: dict[str, torch.Tensor]) -> QuantLinear:
    """Suffix -> tensor (qweight, scales, zeros) back to codes and float32 qparams."""
    return QuantLinear(unpack_int4(t["qweight"]), t["scales"].float(), t["zeros"].float())


def read_int8(t: dict[str, torch.Tensor]) -> QuantLinear:
    scale = t["scales"].float()
    return QuantLinear(t["qweight"].to(torch.int32), scale, torch.zeros_like(scale))


def linear_tensors(w: torch.Tensor | QuantLinear, weight_type: str) -> dict[str, torch.Tensor]:
    """One linear (float weight or quantized codes) as suffix -> tensor in the runtime layout."""
    if isinstance(w, torch.Tensor):
        return {"weight": w}
    return int4_tensors(w) if weight_type == "int4" else int8_tensors(w)


def read_linear(t: dict[str, torch.Tensor], weight_type: str) -> torch.Tensor | QuantLinear:
    """Inverse of ``linear_tensors``: ``t`` holds the suffixes of one linear."""
    if "weight" in t:
        return t["weight"]
    if weight_type == "int4":
        return read_int4(t)
    if weight_type == "int8":
        return read_int8(t)
    raise ValueError(f"quantized tensors in a {weight_type} workspace")


def fuse(parts: list[torch.Tensor | QuantLinear], float_dtype: torch.dtype) -> torch.Tensor | QuantLinear:
    """Concatenate linears along out; mixed float/quantized parts are all stored as float."""
    if all(isinstance(p, QuantLinear) for p in parts):
        groups = {p.codes.shape[1] // p.scale.shape[1] for p in parts}
        assert len(groups) == 1, f"fused linears have different group sizes {groups}"
        return QuantLinear(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat([p.zero for p in parts]))
    return torch.cat([(p.dequantize() if isinstance(p, QuantLinear) else p).to(float_dtype) for p in parts])
