"""A GGUF file into an HF folder (float32 safetensors shards), one tensor at a time.

Each tensor's bytes are read from the file alone (not through the reader's memory map, whose touched pages
would stay resident), dequantized by the ``gguf`` package, renamed and un-permuted by transformers' own GGUF
tables (``get_gguf_hf_weights_map``, ``TENSOR_PROCESSORS``) and appended to the current shard. A shard's
header is known before its data (every shape comes from the config), so nothing waits in memory for a shard
to fill: peak memory is one tensor, or one slice of rows for an embedding or head.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import QconvError
from .shards import INDEX, SINGLE

SHARD_BYTES = 2 << 30
ROWS_BYTES = 16 << 20  # a tensor larger than this (float32) is dequantized this many bytes of rows at a time


def _plan_shards(items: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in items:
        n = 4 * int(np.prod(shape))
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _header(tensors: list[tuple[str, tuple]]) -> bytes:
    """The safetensors header of float32 tensors stored in this order."""
    head, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 4 * int(np.prod(shape))
        head[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True, slots=True)
class _Located:
    """Where a GGUF tensor's bytes are, and the reader's array layout of them ([rows, bytes] when quantized)."""
    name: str
    tensor_type: object
    data_offset: int
    n_bytes: int
    dtype: np.dtype
    shape: tuple


def _read_rows(f, tensor: _Located, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor's stored bytes, read alone."""
    row = tensor.n_bytes // tensor.shape[0]
    f.seek(tensor.data_offset + start * row)
    raw = np.frombuffer(f.read((stop - start) * row), dtype=np.uint8)
    return raw.view(tensor.dtype).reshape(stop - start, *tensor.shape[1:])


def write_hf_weights(gguf: Path, folder: Path, config, shard_bytes: int = SHARD_BYTES) -> None:
    """The GGUF's tensors as ``folder``'s float32 safetensors (with an index when there are several shards)."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          read_field)

    # The reader parses every metadata field (the vocabulary: Python objects worth hundreds of MB for a large
    # one); keep only what locates each tensor, and let the rest go before any tensor is dequantized.
    reader = GGUFReader(str(gguf))
    arch = read_field(reader, "general.architecture")[0]
    tensors = [_Located(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes), t.data.dtype, t.data.shape)
               for t in reader.tensors]
    del reader
    cfg = config.to_dict()
    parsed = {"config": cfg, "tensors": {}}
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    to_hf = get_gguf_hf_weights_map(skeleton, processor)
    tied = getattr(config, "tie_word_embeddings", False)
    wanted = [(t, to_hf[t.name]) for t in tensors
              if t.name in to_hf and not (tied and to_hf[t.name] == "lm_head.weight")]
    missing = set(shapes) - {hf for _, hf in wanted} - ({"lm_head.weight"} if tied else set())
    if missing:
        raise QconvError(f"{gguf} has no tensor for {sorted(missing)[0]!r} (config.json implies it); the GGUF "
                         f"is incomplete or of another architecture")
    plan = _plan_shards([(hf, shapes[hf]) for _, hf in wanted], shard_bytes)
    names = [SINGLE] if len(plan) == 1 else [f"model-{k:05d}-of-{len(plan):05d}.safetensors"
                                             for k in range(1, len(plan) + 1)]
    source = {hf: t for t, hf in wanted}
    kw = dict(tensor_key_mapping=to_hf, parsed_parameters=parsed)
    with open(gguf, "rb") as f:
        for shard, name in zip(plan, names):
            with open(folder / name, "wb") as out:
                out.write(_header(shard))
                for hf, shape in shard:
                    _write_tensor(out, f, source[hf], hf, shape, processor, dequantize, kw)
    if len(plan) > 1:
        total = sum(4 * int(np.prod(s)) for _, s in sum(plan, []))
        weight_map = {hf: n for shard, n in zip(plan, names) for hf, _ in shard}
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def _write_tensor(out, f, tensor, hf: str, shape: tuple, processor, dequantize, kw) -> None:
    row_bytes = 4 * int(np.prod(shape[1:]))
    rows = shape[0] if row_bytes * shape[0] <= ROWS_BYTES else max(1, ROWS_BYTES // row_bytes)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        w = dequantize(_read_rows(f, tensor, start, stop), tensor.tensor_type)
        result = processor.process(weights=w, name=tensor.name, **kw)
        if rows < shape[0] and result.weights is not w:
            raise QconvError(f"internal: transformers' GGUF processor rewrites {tensor.name} whole, so it cannot "
                             f"be dequantized a slice of rows at a time")
        w = np.ascontiguousarray(result.weights, dtype=np.float32)
        if tuple(w.shape) != (stop - start, *shape[1:]):
            raise QconvError(f"{tensor.name} in the GGUF has shape {list(w.shape)} but config implies "
                             f"{list(shape)} for {hf}; the GGUF does not match its own metadata")
        out.write(w.data)
