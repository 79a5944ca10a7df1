"""The CPU runner: the torch model (runtime/cpu/model.py) over the KV cache, one forward per run of adjacent
cache rows (``KVCache.rows`` views them as a cache of their own)."""
from __future__ import annotations

import torch

from ..runner import Runner, contiguous_runs


class CpuRunner(Runner):
    def _device(self) -> torch.device:
        return self.cache.k[0].device

    def prefill(self, prompts: list[list[int]], starts: list[int], rows: list[int]) -> torch.Tensor:
        """Adjacent rows whose prompts all start at position 0 share one forward, left-padded so that column -1
        holds every row's last prompt token. Row i's pads take positions len_i .. S-1, past its prompt: their
        K/V land where its answer is written later, and no prompt token attends to them (a query at position p
        sees keys 0..p). Other prompts run one at a time from their start."""
        out = []
        for i, n in contiguous_runs(rows):
            if n > 1 and not any(starts[i:i + n]):
                out.append(self._padded(prompts[i:i + n], rows[i]))
            else:
                out.extend(self._one(prompts[j], starts[j], rows[j]) for j in range(i, i + n))
        return _joined(out)

    def _padded(self, prompts: list[list[int]], first: int) -> torch.Tensor:
        n, S = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, S, dtype=torch.long)
        pos = torch.empty(n, S, dtype=torch.long)
        for i, p in enumerate(prompts):
            pad = S - len(p)
            ids[i, pad:] = torch.tensor(p)
            pos[i, :pad] = torch.arange(len(p), S)  # pads: positions past the prompt
            pos[i, pad:] = torch.arange(len(p))
        dev = self._device()
        logits = self.model(ids.to(dev), pos.to(dev), self.cache.rows(first, first + n), last_only=True)  # [n, 1, V]
        return logits[:, -1].float()

    def _one(self, prompt: list[int], start: int, row: int) -> torch.Tensor:
        dev = self._device()
        ids = torch.tensor(prompt, device=dev)[None]  # [1, S]
        pos = torch.arange(start, start + len(prompt), device=dev)[None]
        return self.model(ids, pos, self.cache.rows(row, row + 1), last_only=True)[:, -1].float()  # [1, V]

    def decode(self, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        dev, out = self._device(), []
        for i, n in contiguous_runs(rows):
            ids = torch.tensor(tokens[i:i + n], device=dev)[:, None]  # [n, 1]
            pos = torch.tensor(positions[i:i + n], device=dev)[:, None]
            cache = self.cache.rows(rows[i], rows[i] + n)
            out.append(self.model(ids, pos, cache, last_only=True)[:, -1].float())  # [n, V]
        return _joined(out)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The runs' logits in the caller's row order; one run is returned as it is, without a copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
