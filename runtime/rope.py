"""Rotary position embedding maths (neox style: rotate_half over the [x1, x2] halves of head_dim)."""
from __future__ import annotations

import math

import torch

from ..convert.workspace_config import WorkspaceConfig


def inv_freq(cfg: WorkspaceConfig) -> torch.Tensor:
    """[head_dim/2] float32.  default: 1 / theta^(2i/D);  linear: that / factor;  llama3: per-band blend."""
    D = cfg.size_per_head
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if cfg.rope_scaling == "linear":
        return freq / cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / freq
        # long wavelengths (> old_len / lo) are divided by factor, short ones (< old_len / hi) kept,
        # the band between interpolated: smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, freq / factor, freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, blended, scaled)
    return freq


def rotary_tables(cfg: WorkspaceConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [length, head_dim] float32, the half-dim angles repeated for both halves."""
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq(cfg)[None]  # [L, D/2]
    emb = torch.cat([angles, angles], dim=-1)  # [L, D]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos, sin: [B, S, D].  x * cos + rotate_half(x) * sin,  rotate_half([a, b]) = [-b, a]."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, D]
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin
