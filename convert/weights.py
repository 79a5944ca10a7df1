"""A model whose weights stay on disk: a meta-device skeleton, filled one decoder block at a time.

``StreamedWeights`` reads float tensors by their HF names from a folder's safetensors shards, in the
compute dtype; an AWQ or int8 checkpoint's linears are dequantized one at a time (``<linear>.weight``
from its qweight, qzeros and scales). ``fill`` gives a module real tensors, ``drop`` returns them to
the meta device, so only the block being computed (and the embedding, head or norm while they are
used) takes host memory.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import QconvError
from .awq_export import dequantize_linear
from .shards import ShardSet

_PACKED = (".qweight", ".qzeros", ".scales")


class StreamedWeights:
    def __init__(self, folder: Path, dtype: torch.dtype, qcfg: dict | None = None):
        self.folder, self.dtype, self.qcfg = Path(folder), dtype, qcfg
        self.shards = ShardSet(folder)

    def __contains__(self, name: str) -> bool:
        return name in self.shards or (self.qcfg is not None and self._packed(name) in self.shards)

    @staticmethod
    def _packed(name: str) -> str:
        return name.removesuffix(".weight") + ".qweight"

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in the compute dtype (integer tensors as stored)."""
        if name not in self.shards and name in self:
            base = name.removesuffix(".weight")
            zeros = self.shards.read(f"{base}.qzeros") if f"{base}.qzeros" in self.shards else None
            w = dequantize_linear(self.qcfg, self.shards.read(f"{base}.qweight"), zeros,
                                  self.shards.read(f"{base}.scales"))
            return w.to(self.dtype)
        if name not in self.shards:
            raise QconvError(f"the checkpoint in {self.folder} has no tensor {name!r}; is it complete?")
        t = self.shards.read(name)
        return t.to(self.dtype) if t.is_floating_point() else t

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a stored float matrix (an embedding), in the compute dtype."""
        return self.shards.read_rows(name, start, stop).to(self.dtype)

    def file_of(self, name: str) -> Path:
        return self.shards.file_of(name if name in self.shards else self._packed(name))

    def check(self, expected: dict[str, tuple[int, ...]], optional: set[str]) -> None:
        """Every tensor of ``expected`` (the skeleton's state dict, shapes from config.json) is present, and
        those stored unpacked have the expected shape: bad input fails here, before any compute."""
        for name, shape in expected.items():
            if name not in self and name not in optional:
                raise QconvError(f"{self.folder}: tensor {name!r}, which config.json implies, is in none of "
                                 f"the safetensors files; the checkpoint is incomplete")
        self.shards.check_shapes({k: v for k, v in expected.items() if k in self.shards})

    def fill(self, module: torch.nn.Module, prefix: str) -> None:
        """Give ``module``'s parameters and persistent buffers their stored values (``prefix`` + local name)."""
        for name, t in module.state_dict(keep_vars=True).items():
            value = self.get(prefix + name)
            if tuple(value.shape) != tuple(t.shape):
                raise QconvError(f"{self.file_of(prefix + name)}: tensor {prefix + name!r} has shape "
                                 f"{list(value.shape)} but config.json implies {list(t.shape)}; the weights do "
                                 f"not match the config")
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if attr in owner._parameters:
                owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value

    @staticmethod
    def drop(module: torch.nn.Module) -> None:
        module.to("meta")


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
