"""The llama-family decoder (llama, mistral, qwen2, qwen3) in plain PyTorch, no transformers modeling code.

GQA, optional q/k/v bias, optional per-head q/k RMSNorm before rotary, tied embeddings. The linears
come built (runtime/cpu/linear.py). Every forward reads and writes the static KV cache; rows of the batch
are independent sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...convert.workspace_config import WorkspaceConfig
from ..kv_cache import KVCache, shared_start
from ..rope import apply_rotary, rotary_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the mean taken in float32 over the last dim."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def attention_mask(pos: torch.Tensor, start: int | None, length: int) -> tuple[torch.Tensor | None, bool]:
    """(mask, causal) for attention of queries at pos [B, S] over keys 0..length-1 (query s of row b sees the keys
    <= pos[b, s]). Where every row holds the same span start..start+S-1 (``start``, see shared_start) no mask
    tensor is needed: one query sees every key (a decode step), or the span is the prompt from 0 (causal, which
    SDPA runs ~2x faster on the CPU than the same mask as a tensor: 2048 tokens, 72 against 137 ms a layer).
    Else the mask [B, 1, S, L] (True = attend), rows of different lengths sharing a batch."""
    if start is not None and pos.shape[1] == 1:
        return None, False
    if start == 0:
        return None, True
    keys = torch.arange(length, device=pos.device)
    return keys[None, None, None, :] <= pos[:, None, :, None], False


class LayerWeights(nn.Module):
    """One decoder layer's weights; ``p`` maps the layout's names (convert/layout.py) to norm weights and
    built linears. The CPU Block below and runtime/cuda/model.py's layers both hold them this way."""

    def __init__(self, p: dict):
        super().__init__()
        self.attention_norm = nn.Parameter(p["attention_norm.weight"], requires_grad=False)
        self.ffn_norm = nn.Parameter(p["ffn_norm.weight"], requires_grad=False)
        self.register_buffer("q_norm", p.get("attention.q_norm.weight"), persistent=False)  # [D] or None
        self.register_buffer("k_norm", p.get("attention.k_norm.weight"), persistent=False)
        self.wqkv, self.wo = p["attention.wqkv"], p["attention.wo"]
        self.w13, self.w2 = p["feed_forward.w13"], p["feed_forward.w2"]


class Block(LayerWeights):
    """One decoder layer: its weights and the plain-PyTorch forward."""

    def __init__(self, cfg: WorkspaceConfig, p: dict, layer: int):
        super().__init__(p)
        self.layer, self.eps = layer, cfg.norm_eps
        self.hq, self.hkv, self.d = cfg.head_num, cfg.kv_head_num, cfg.size_per_head

    def forward(self, x, cos, sin, pos, start, keys, cache: KVCache):
        # x: [B, S, hidden]; cos, sin: [B, S, D]; pos: [B, S]; keys: (L, mask, causal) of attention_mask
        B, S, _ = x.shape
        h = rms_norm(x, self.attention_norm, self.eps)
        q, k, v = self.wqkv(h).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(B, S, self.hq, self.d)    # [B, S, Hq * D] -> [B, S, Hq, D]
        k = k.view(B, S, self.hkv, self.d)
        if self.q_norm is not None:  # per-head RMSNorm over D, before rotary (qwen3)
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, Hq, S, D]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # [B, Hkv, S, D]
        v = v.view(B, S, self.hkv, self.d).transpose(1, 2)
        cache.write(self.layer, pos, k, v, start)
        length, mask, causal = keys
        o = cache.attention(self.layer, q, length, mask, causal)  # [B, Hq, S, D]
        x = x + self.wo(o.transpose(1, 2).reshape(B, S, self.hq * self.d))
        h = rms_norm(x, self.ffn_norm, self.eps)
        gate, up = self.w13(h).chunk(2, dim=-1)  # [B, S, 2 * inter] -> 2 x [B, S, inter]
        return x + self.w2(F.silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, cfg: WorkspaceConfig, glob: dict[str, torch.Tensor], layers: list[dict], max_len: int):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Parameter(glob["tok_embeddings.weight"], requires_grad=False)  # [V, hidden]
        self.norm = nn.Parameter(glob["norm.weight"], requires_grad=False)
        output = glob.get("output.weight")
        self.output = self.tok_embeddings if output is None else nn.Parameter(output, requires_grad=False)
        self.layers = nn.ModuleList(Block(cfg, p, i) for i, p in enumerate(layers))
        cos, sin = rotary_tables(cfg, max_len)  # [max_len, D] float32
        dev, dtype = self.tok_embeddings.device, self.tok_embeddings.dtype
        self.register_buffer("cos", cos.to(dev, dtype), persistent=False)
        self.register_buffer("sin", sin.to(dev, dtype), persistent=False)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """ids, pos: [B, S] -> logits [B, S, V] (or [B, 1, V] with ``last_only``) in the compute dtype.

        Row b attends to cache positions 0..pos[b, s]; positions past a row's length are masked, so
        rows of different lengths can share a batch.
        """
        length = int(pos.max()) + 1
        assert length <= cache.max_len, f"position {length - 1} is past the cache ({cache.max_len})"
        start = shared_start(pos)
        keys = (length, *attention_mask(pos, start, length))
        cos, sin = self.cos[pos], self.sin[pos]  # [B, S, D]
        x = F.embedding(ids, self.tok_embeddings)  # [B, S, hidden]
        for block in self.layers:
            x = block(x, cos, sin, pos, start, keys, cache)
        if last_only:
            x = x[:, -1:]
        return F.linear(rms_norm(x, self.norm, self.cfg.norm_eps), self.output)
