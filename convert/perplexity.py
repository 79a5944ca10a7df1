"""Perplexity by BENCH_PROTOCOL: the whole text tokenized once, consecutive non-overlapping windows from token 0,
ppl = exp(mean NLL over every predicted token). One definition for `qconv eval --model` (pipelines/eval.py) and for
workspaces through the bundled runtime (runtime/evaluate.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import QconvError


@dataclass(slots=True)
class PplResult:
    ppl: float
    nll: float
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    wall_s: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def eval_windows(text: str, tokenizer, seqlen: int, windows: int | None) -> torch.Tensor:
    """[N, seqlen] consecutive, non-overlapping windows from token 0 (default special tokens)."""
    if seqlen <= 1:
        raise QconvError(f"--seqlen must be at least 2, got {seqlen}")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    avail = ids.numel() // seqlen
    if avail == 0:
        raise QconvError(f"the text has {ids.numel()} tokens, less than one window of {seqlen}")
    n = avail if windows is None else min(windows, avail)
    if windows is not None and windows <= 0:
        raise QconvError(f"--windows must be positive, got {windows}")
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.inference_mode()
def perplexity(logits_fn, windows: torch.Tensor, device: torch.device, desc: str = "eval") -> PplResult:
    """``logits_fn(ids [1, S]) -> logits [1, S, V]``; NLL is summed in float32 over every predicted token."""
    t0 = time.perf_counter()
    total, count = 0.0, 0
    bar = tqdm(windows, desc=desc, unit="win", dynamic_ncols=True)
    for w in bar:
        ids = w[None].to(device)
        logits = logits_fn(ids)[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    nll = total / count
    return PplResult(math.exp(nll), nll, count, windows.shape[0], windows.shape[1], time.perf_counter() - t0)
