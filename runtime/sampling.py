"""Next-token choice as pure functions on a batch of logits [B, V]."""
from __future__ import annotations

import torch

from .generation import GenerationConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits, seen (bool): [B, V]. For seen tokens: l / p if l > 0 else l * p (CTRL / HF convention)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, -inf elsewhere (k = 0: all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability sums to >= p (always the most likely one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the mass before it already reaches p
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V], seen [B, V] -> next token ids [B]. Greedy without a penalty takes the argmax in the
    logits' own dtype (the same choice; one kernel less per token on the GPU); the rest works in float32."""
    if gen.temperature == 0 and gen.repetition_penalty == 1.0:
        return logits.argmax(dim=-1)
    logits = apply_repetition_penalty(logits.float(), seen, gen.repetition_penalty)
    if gen.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / gen.temperature, gen.top_k), gen.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
