"""AWQ searches as functions of tensors: which per-channel scale, and which per-group clip.

Searching is kept apart from applying (``apply_scale``/``apply_clip``): the search returns plain
tensors keyed by module name, which are saved per block and replayed at export.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..convert.quant import fake_quantize


@dataclass(frozen=True, slots=True)
class QuantCfg:
    bits: int = 4
    group_size: int = 128
    sym: bool = False


def w_mean_of(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its quantization group's max: [in] float32."""
    w = torch.cat([x.float() for x in weights], dim=0)  # [sum_out, in]
    g = group_size if group_size > 0 else w.shape[1]
    wg = w.abs().reshape(-1, g)  # [sum_out * in/g, g]
    return (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(dim=0)


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int = 20) -> tuple[torch.Tensor, list]:
    """Grid of per-channel scales [n_grid + 1, in] and their alphas.

    s = mean|x|^a / (mean|w|^(1-a) + 1e-4), a in {0, 1/n, ..., (n-1)/n}, normalised so that
    max(s) * min(s) = 1. The last row is s = 1 (no scaling), so the search never does worse than RTN.
    """
    x_mean, w_mean = x_mean.float(), w_mean.float()
    alphas = [i / n_grid for i in range(n_grid)]
    a = torch.tensor(alphas, device=x_mean.device)[:, None]  # [n, 1]
    s = (x_mean[None].pow(a) / (w_mean[None].pow(1 - a) + 1e-4)).clamp(min=1e-4)  # [n, in]
    s = s / (s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True)).sqrt()
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return torch.cat([s, torch.ones_like(s[:1])]), alphas + [None]


def quantized_scaled(w: torch.Tensor, s: torch.Tensor, q: QuantCfg) -> torch.Tensor:
    """Q(w * s) / s, the weight a scaled-then-quantized linear effectively applies to x (same dtype as w)."""
    return (fake_quantize(w.float() * s, q.bits, q.group_size, q.sym) / s).to(w.dtype)


@torch.no_grad()
def search_scale(forward, chunks, weights: dict[str, torch.Tensor], cands: torch.Tensor, q: QuantCfg,
                 cache_bytes: int = 256 << 20) -> torch.Tensor:
    """Output MSE of every candidate scale: [n_cand] float32 (on the data's device).

    ``forward(x, overrides)`` runs the inspected module on one input chunk with the named weights
    replaced; each chunk's full-precision output is computed once and every candidate is compared
    against it. Candidate weights are quantized once and kept while they fit in ``cache_bytes``.
    Losses accumulate on the device, so the whole grid runs without a host sync.
    """
    losses = torch.zeros(len(cands), dtype=torch.float32, device=cands.device)
    per_cand = sum(w.numel() * w.element_size() for w in weights.values())
    cache: dict[int, dict] = {}
    numel = 0
    for x in chunks:
        ref = forward(x, weights).float()
        numel += ref.numel()
        for c, s in enumerate(cands):
            wq = cache.get(c) or {name: quantized_scaled(w, s, q) for name, w in weights.items()}
            if per_cand * len(cands) <= cache_bytes:
                cache[c] = wq
            losses[c] += (forward(x, wq).float() - ref).pow(2).sum()
    return losses / numel


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, q: QuantCfg, n_grid: int = 20, max_shrink: float = 0.5,
                chunk_bytes: int = 256 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Best per-group max magnitude for ``w`` [out, in] on sampled inputs ``x`` [n, in].

    Candidates shrink each group's max |w| by 0, 2.5%, ..., 47.5% (``n_grid`` points up to
    ``max_shrink``); each group keeps the one with the least output MSE on its own slice of the input.
    That error needs no per-token products: with d = Q(w) - w on group G and C_G = X_G^T X_G / n,
        mean_t (x_t,G . d)^2 = d^T C_G d,
    so each candidate costs out * in * g multiply-adds instead of n * in * out (32-64x less for
    4096 tokens and g = 64/128). Per-channel int8 (g = in) keeps the direct product when g >= n.
    Output rows go in chunks of about ``chunk_bytes``. Returns (clip_max [out, G], ratio [out, G]).
    """
    out_f, in_f = w.shape
    g = q.group_size if q.group_size > 0 else in_f
    G = in_f // g
    xg = x.to(w.dtype).reshape(-1, G, g).transpose(0, 1)  # [n, in] -> [G, n, g]
    n = xg.shape[1]
    gram = g < n
    if gram:
        xf = xg.float()
        cov = torch.bmm(xf.transpose(1, 2), xf) / n  # C: [G, g, g]
        oc_chunk = max(16, chunk_bytes // (in_f * 4 * 3))  # rows per pass: d, C d and the product fit
    else:
        oc_chunk = max(16, chunk_bytes // (G * n * 4))  # rows per pass: each [G, n, o] fp32 output fits
    best_max, best_ratio = [], []
    for o0 in range(0, out_f, oc_chunk):
        wc = w[o0:o0 + oc_chunk]  # [o, in]
        wg = wc.reshape(-1, G, g)  # [o, G, g]
        ref = None if gram else torch.bmm(xg, wg.permute(1, 2, 0)).float()  # [G, n, o]
        org_max = wg.abs().amax(dim=-1).float()  # [o, G]
        err_best = torch.full_like(org_max, float("inf"))
        ratio_best = torch.ones_like(org_max)
        for i in range(n_grid):
            ratio = 1.0 - max_shrink * i / n_grid
            mv = org_max * ratio
            wq = fake_quantize(torch.clamp(wc.float(), -mv.repeat_interleave(g, 1), mv.repeat_interleave(g, 1)),
                               q.bits, q.group_size, q.sym).to(w.dtype)
            if gram:
                d = (wq.float() - wc.float()).reshape(-1, G, g).transpose(0, 1)  # [G, o, g]
                err = (torch.bmm(d, cov) * d).sum(-1).t()  # d^T C d: [G, o] -> [o, G]
            else:
                out = torch.bmm(xg, wq.reshape(-1, G, g).permute(1, 2, 0)).float()  # [G, n, o]
                err = (out - ref).pow(2).mean(dim=1).t()  # [o, G]
            better = err < err_best
            err_best = torch.where(better, err, err_best)
            ratio_best = torch.where(better, torch.full_like(ratio_best, ratio), ratio_best)
        best_max.append(org_max * ratio_best)
        best_ratio.append(ratio_best)
    return torch.cat(best_max), torch.cat(best_ratio)


def apply_scale(block: torch.nn.Module, prev_op, linears: list, s: torch.Tensor) -> None:
    """Fold s into the producer and the consumers: prev /= s (norm weight or linear rows), linear columns *= s.

    The block computes the same function afterwards (before quantization).
    """
    s = s.to(prev_op.weight.device)
    if isinstance(prev_op, torch.nn.Linear):
        prev_op.weight.div_(s[:, None].to(prev_op.weight.dtype))  # rows: output channels of prev
    else:
        prev_op.weight.div_(s.to(prev_op.weight.dtype))
    if getattr(prev_op, "bias", None) is not None:
        prev_op.bias.div_(s.to(prev_op.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def apply_clip(linear: torch.nn.Linear, clip_max: torch.Tensor) -> None:
    """Clamp each weight group to [-clip, clip]; clip_max [out, G]."""
    g = linear.weight.shape[1] // clip_max.shape[1]
    mv = clip_max.repeat_interleave(g, dim=1).to(linear.weight)
    linear.weight.copy_(torch.clamp(linear.weight, -mv, mv))
