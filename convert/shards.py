"""Sharded safetensors, read one tensor at a time and written one shard at a time.

File layout (the safetensors format): u64 header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the data (offsets relative to its start).

Reading parses the header once per shard and ``pread``s each tensor into a fresh buffer when asked. A
memory map would serve the same bytes, but pages touched through a map stay in the process's resident set
until the kernel is short of memory, so peak RSS would grow with the checkpoint instead of with one block.

Writing (``ShardWriter``) buffers tensors until a shard is full, writes it, and at the end names the shards
``model-0000k-of-0000n.safetensors`` with a ``model.safetensors.index.json``, as transformers writes them; a
checkpoint that fits one shard is a single ``model.safetensors``.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .. import QconvError
from .sizes import DEFAULT_SHARD_BYTES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class Shard:
    """One ``.safetensors`` file: its header, and reads of single tensors by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise QconvError(f"checkpoint file {self.path} is corrupt or truncated ({e}); download or "
                             f"write it again") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, dict] = header
        for name, e in header.items():  # a truncated file: name the first tensor whose bytes are missing
            if self.base + e["data_offsets"][1] > size:
                raise QconvError(f"checkpoint file {self.path} is truncated: tensor {name!r} ends at byte "
                                 f"{self.base + e['data_offsets'][1]} of a {size}-byte file; download or write "
                                 f"it again")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return self._pread(name, e["data_offsets"][0], e["data_offsets"][1], e["shape"])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor [R, ...], read alone."""
        e = self.entries[name]
        stop = min(stop, e["shape"][0])
        row = (e["data_offsets"][1] - e["data_offsets"][0]) // max(1, e["shape"][0])
        begin = e["data_offsets"][0] + start * row
        return self._pread(name, begin, begin + (stop - start) * row, [stop - start, *e["shape"][1:]])

    def _pread(self, name: str, begin: int, end: int, shape) -> torch.Tensor:
        dtype = _DTYPES.get(self.entries[name]["dtype"])
        if dtype is None:
            raise QconvError(f"{self.path}: tensor {name!r} has dtype {self.entries[name]['dtype']}, which qconv "
                             f"does not read")
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            if f.readinto(buf) != len(buf):
                raise QconvError(f"checkpoint file {self.path} is truncated: tensor {name!r} cannot be read whole")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class ShardSet:
    """Every tensor of an HF folder: by ``model.safetensors.index.json`` when there is one, else every
    ``*.safetensors`` file. The index is checked against the shards' headers on open."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where: dict[str, Shard] = {}
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise QconvError(f"{index} is not a valid safetensors index ({e}); write it again") from None
            shards = {f: Shard(self.folder / f) for f in sorted(set(weight_map.values()))
                      if self._exists(index, f, weight_map)}
            for name, f in weight_map.items():
                if name not in shards[f].entries:
                    raise QconvError(f"{index} places tensor {name!r} in {self.folder / f}, which does not hold "
                                     f"it; the checkpoint is incomplete")
                self.where[name] = shards[f]
            return
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise QconvError(f"{self.folder} has no .safetensors weights; qconv reads safetensors checkpoints")
        for f in files:
            shard = Shard(f)
            for name in shard.entries:
                self.where[name] = shard

    def _exists(self, index: Path, f: str, weight_map: dict) -> bool:
        if not (self.folder / f).is_file():
            name = next(n for n, g in weight_map.items() if g == f)
            raise QconvError(f"{index} places tensor {name!r} in {self.folder / f}, which does not exist; "
                             f"the checkpoint is incomplete")
        return True

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self):
        return self.where.keys()

    def file_of(self, name: str) -> Path:
        return self.where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.where[name].read_rows(name, start, stop)

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor that ``expected`` names has that shape (from config.json, via a meta-device model)."""
        for name, shape in expected.items():
            if name in self.where and self.shape(name) != tuple(shape):
                raise QconvError(f"{self.file_of(name)}: tensor {name!r} has shape {list(self.shape(name))} but "
                                 f"config.json implies {list(shape)}; the weights do not match the config")


class ShardWriter:
    """Collects tensors in order and writes a shard whenever adding one would pass ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        if max_bytes <= 0:
            raise QconvError(f"the shard size must be positive, got {max_bytes} bytes")
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary file name, its tensors)
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.total += nbytes

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        tmp = f".shard-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, give the shards their final names, write the index; returns the file names."""
        self.flush()
        n = len(self.files)
        names = [SINGLE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        weight_map = {}
        for (tmp, tensors), final in zip(self.files, names):
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
