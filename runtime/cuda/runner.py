"""The CUDA runner: the Triton model (runtime/cuda/model.py) and the CUDA graphs of its decode step
(runtime/cuda/graphs.py), which only this runner holds.

On a CUDA device, decode steps, greedy bursts and short prompts (up to opts.prefill_rows tokens, packed into
steps whose rows are their tokens) replay graphs; longer prompts run the model's prefill path, as the CPU
runner runs its model. Under Triton's interpreter (tests without a GPU) there are no graphs, and every step
takes that eager path.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..cpu.runner import CpuRunner
from ..kv_cache import KVCache
from ..options import RuntimeOptions
from .kernels import pdl_enabled


class CudaRunner(CpuRunner):
    def __init__(self, model, cache: KVCache, opts: RuntimeOptions, with_graphs: bool | None = None):
        """``with_graphs``: hold DecodeGraphs (None: when the cache is on a CUDA device; True elsewhere is for
        tests, which stub the few CUDA runtime calls and set opts.cuda_graphs=False for eager steps)."""
        super().__init__(model, cache)
        self.pdl = opts.pdl
        if with_graphs is None:
            with_graphs = cache.k[0].device.type == "cuda"
        self.graphs = None
        if with_graphs:  # the graphs' kernels need triton, which a CPU-only install lacks
            from .graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, cache, opts)

    def _launches(self):
        """Kernel launches (and graph captures) under opts.pdl."""
        return pdl_enabled(self.pdl)

    def prefill(self, prompts: list[list[int]], starts: list[int], rows: list[int]) -> torch.Tensor:
        with self._launches():
            if self.graphs is not None and max(map(len, prompts)) <= self.graphs.prefill_rows:
                return self.graphs.prefill(prompts, starts, rows)
            return super().prefill(prompts, starts, rows)

    def decode(self, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """On graphs: [n, V] in the compute dtype, a view of the static buffer, valid until the next step."""
        with self._launches():
            if self.graphs is None:
                return super().decode(tokens, positions, rows)
            return self.graphs.step_host(tokens, positions, rows)

    def greedy(self, tokens: list[int], positions: list[int], rows: list[int], steps: int) -> Iterator[list[int]]:
        if self.graphs is None:
            steps_ = super().greedy(tokens, positions, rows, steps)
        else:
            steps_ = self.graphs.greedy_rows(tokens, positions, steps, rows)
        while True:  # each resume launches (and may capture) under opts.pdl, none of the caller's code does
            with self._launches():
                step = next(steps_, None)
            if step is None:
                return
            yield step

    def close(self) -> None:
        self.graphs = None  # its buffers and graph memory pool go with it
