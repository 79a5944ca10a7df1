"""The tensor side of continuous batching: one forward over a run of KV-cache rows (slots).

The scheduler (runtime/serve/scheduler.py) keeps the bookkeeping; these two functions only build ids/pos and
call ``model(ids [B, S], pos [B, S], cache, last_only=True)`` on ``cache.rows(first, first + B)``, the one
narrow interface to the model. A faster model (another attention kernel, CUDA graphs) slots in here.

Rows that hold no sequence ride along in a decode step as token 0 at position 0: they write junk into
their own row's position 0, which the next prefill of that row overwrites before anything reads it.
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache


def prefill(model, cache: KVCache, first: int, prompts: list[list[int]]) -> torch.Tensor:
    """Prompts of rows first..first+n-1, each from position 0 -> logits after each prompt: [n, V] float32.

    Left padding, so that column -1 holds every row's last prompt token. Row i's pads take positions
    len_i .. S-1, past its prompt: their K/V land where its answer will be written later, and no prompt
    token attends to them (a query at position p sees keys 0..p).
    """
    n, S = len(prompts), max(len(p) for p in prompts)
    assert S <= cache.max_len, f"a prompt of {S} tokens is longer than the cache ({cache.max_len})"
    ids = torch.zeros(n, S, dtype=torch.long)
    pos = torch.empty(n, S, dtype=torch.long)
    for i, p in enumerate(prompts):
        pad = S - len(p)
        ids[i, pad:] = torch.tensor(p)
        pos[i, :pad] = torch.arange(len(p), S)  # pads: positions past the prompt
        pos[i, pad:] = torch.arange(len(p))
    dev = cache.k[0].device
    logits = model(ids.to(dev), pos.to(dev), cache.rows(first, first + n), last_only=True)  # [n, 1, V]
    return logits[:, -1].float()


def decode(model, cache: KVCache, first: int, tokens: list[int | None], positions: list[int]) -> torch.Tensor:
    """One token per row first..first+B-1 (None: a free row) at its position -> next-token logits [B, V] float32."""
    B = len(tokens)
    ids = torch.tensor([[0 if t is None else t] for t in tokens], dtype=torch.long)  # [B, 1]
    pos = torch.tensor([[0 if t is None else p] for t, p in zip(tokens, positions)], dtype=torch.long)  # [B, 1]
    dev = cache.k[0].device
    logits = model(ids.to(dev), pos.to(dev), cache.rows(first, first + B), last_only=True)  # [B, 1, V]
    return logits[:, -1].float()
