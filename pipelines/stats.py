"""Running per-channel statistics, as pure reductions plus an elementwise merge.

Three passes over the data: aminmax, sum, and the L1 norm (sum of |x|). absmax is derived from
the extremes: absmax = max(-min, max), so it needs no pass of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LINEAR_STATS = ("max", "min", "mean", "absmax", "absmean")
KV_STATS = ("min", "max", "absmax")


def col_stats_torch(x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x2: [T, C] -> (min, max, sum, abssum) per channel, float32; three passes."""
    lo, hi = torch.aminmax(x2, dim=0)
    return (lo.float(), hi.float(), x2.sum(dim=0, dtype=torch.float32),
            torch.linalg.vector_norm(x2, ord=1, dim=0, dtype=torch.float32))


@dataclass(slots=True)
class ChannelStats:
    """Sufficient statistics over all tokens, per channel. Tensors are float32 on the data's device."""

    min: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor
    abssum: torch.Tensor
    count: int

    @classmethod
    def of(cls, x: torch.Tensor) -> "ChannelStats":
        # x: [..., C] -> per channel C
        x2 = x.reshape(-1, x.shape[-1])
        return cls(*col_stats_torch(x2), x2.shape[0])

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        return ChannelStats(torch.minimum(self.min, other.min), torch.maximum(self.max, other.max),
                            self.sum + other.sum, self.abssum + other.abssum, self.count + other.count)

    def finalize(self) -> dict[str, torch.Tensor]:
        return {
            "max": self.max.cpu(),
            "min": self.min.cpu(),
            "mean": (self.sum / self.count).cpu(),
            "absmax": torch.maximum(-self.min, self.max).cpu(),
            "absmean": (self.abssum / self.count).cpu(),
        }


def head_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, head_dim) extremes of x: [B, H, S, D] -> ([H, D], [H, D]) float32."""
    return x.amin(dim=(0, 2)).float(), x.amax(dim=(0, 2)).float()


def merge_minmax(a, b):
    if a is None:
        return b
    return torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1])


def kv_stats(minmax: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    lo, hi = minmax
    return {"min": lo.cpu(), "max": hi.cpu(), "absmax": torch.maximum(-lo, hi).cpu()}
