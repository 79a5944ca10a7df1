"""The one seam between the engine (and the server's scheduler) and a backend.

    runner = make_runner(ws, opts)                              # CpuRunner or CudaRunner
    logits = runner.prefill([[1, 2, 3]], starts=[0], rows=[0])  # [n, V] float32: after each prompt's last token
    logits = runner.decode([4], positions=[3], rows=[0])        # [n, V]: one step, a token per cache row
    for step in runner.greedy([4], [3], [0], steps=16): ...     # argmax decoding: a list of tokens per step
    logits = runner.logits(ids)                                 # [B, S, V] float32, rows 0..B-1 from position 0

A row is a row of the KV cache, one sequence. Callers never ask which backend they hold: the CPU runner runs
the torch model (runtime/cpu), the CUDA runner the Triton model and its CUDA graphs (runtime/cuda), which only
it knows about.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .kv_cache import KVCache


class Runner:
    """A model over its KV cache. Subclasses implement the forward passes; ``greedy`` has a generic form."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache

    @property
    def rows(self) -> int:
        return self.cache.batch

    def prefill(self, prompts: list[list[int]], starts: list[int], rows: list[int]) -> torch.Tensor:
        """prompts[j] enters cache row rows[j] from position starts[j] -> the next-token logits after each
        prompt's last token, [n, V] float32."""
        raise NotImplementedError

    def decode(self, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """tokens[j] enters cache row rows[j] (distinct rows) at positions[j] -> next-token logits [n, V], in
        the compute dtype or float32."""
        raise NotImplementedError

    def greedy(self, tokens: list[int], positions: list[int], rows: list[int], steps: int) -> Iterator[list[int]]:
        """``steps`` greedy steps of several sequences: row j is fed tokens[j] at positions[j], then each step's
        argmax -> each step's tokens. A backend may compute a few steps past the caller's last read."""
        pos = list(positions)
        for _ in range(steps):
            tokens = self.decode(tokens, pos, rows).argmax(dim=-1).tolist()
            pos = [p + 1 for p in pos]
            yield tokens

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S]: rows 0..B-1, each a fresh sequence from position 0 -> logits [B, S, V] float32."""
        B, S = ids.shape
        dev = self.cache.k[0].device
        pos = torch.arange(S, device=dev).expand(B, S)
        return self.model(ids.to(dev), pos, self.cache.rows(0, B)).float()

    def close(self) -> None:
        """Free what the runner holds beyond the model and cache (graphs, buffers)."""


def contiguous_runs(rows: list[int]) -> list[tuple[int, int]]:
    """(start index, length) of each run of consecutive rows, in the order given: [3, 4, 0] -> [(0, 2), (2, 1)]."""
    runs: list[tuple[int, int]] = []
    for i, r in enumerate(rows):
        if runs and rows[i - 1] + 1 == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs
