"""Static, preallocated KV cache: one [B, H_kv, S_max, D] buffer per layer for K and for V.

quant_policy 0 stores K (post-rotary) and V in the compute dtype. quant_policy 4 stores them as int8
with static per-head params, q = clamp(round((x - zp) / scale), -128, 127), and reads x = q * scale + zp.
Every row of the batch is its own sequence: writes go to the positions each row names.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..convert.quant import kv_dequantize, kv_quantize


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device,
                 qparams: dict[int, tuple[torch.Tensor, ...]] | None = None):
        self.dtype, self.max_len, self.batch = dtype, max_len, batch
        store = torch.int8 if qparams is not None else dtype
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        # per layer (k_scale, k_zp, v_scale, v_zp), each [H_kv] -> [1, H_kv, 1, 1] float32
        self.qparams = None if qparams is None else {
            i: tuple(p.to(device=device, dtype=torch.float32)[None, :, None, None] for p in ps)
            for i, ps in qparams.items()}

    @property
    def quantized(self) -> bool:
        return self.qparams is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares this one's storage (views, no copy):
        a server prefills one sequence's row, or decodes a run of rows, through the same forward."""
        assert 0 <= start < stop <= self.batch, f"rows {start}..{stop - 1} of a cache of {self.batch}"
        view = copy.copy(self)  # dtype, max_len, qparams shared
        view.batch = stop - start
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        return view

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | None) -> None:
        """pos: [B, S] positions; k, v: [B, H_kv, S, D] (k after rotary).

        ``start``: when every row writes positions start..start+S-1 (see ``shared_start``), a slice copy.
        """
        if self.qparams is not None:
            ks, kz, vs, vz = self.qparams[layer]
            k, v = kv_quantize(k, ks, kz), kv_quantize(v, vs, vz)
        B, S = pos.shape
        if start is not None:
            self.k[layer][:B, :, start:start + S] = k
            self.v[layer][:B, :, start:start + S] = v
        else:
            rows = torch.arange(B, device=pos.device)[:, None]  # [B, 1] with pos [B, S] -> [B, S, H, D]
            self.k[layer][rows, :, pos] = k.transpose(1, 2)
            self.v[layer][rows, :, pos] = v.transpose(1, 2)

    def stored(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first ``length`` positions as stored (int8 codes with quant_policy 4): views, no copy."""
        return self.k[layer][:batch, :, :length], self.v[layer][:batch, :, :length]

    def read(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first ``length`` positions: [batch, H_kv, length, D] in the compute dtype."""
        k, v = self.stored(layer, batch, length)
        if self.qparams is None:
            return k, v
        ks, kz, vs, vz = self.qparams[layer]
        return kv_dequantize(k, ks, kz, self.dtype), kv_dequantize(v, vs, vz, self.dtype)


def shared_start(pos: torch.Tensor) -> int | None:
    """The first position if every row of pos [B, S] is the same contiguous span, else None."""
    start = int(pos[0, 0])
    span = torch.arange(start, start + pos.shape[1], device=pos.device)
    return start if bool((pos == span).all()) else None


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False,
                    qparams: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q [B, Hq, S, D] over a cache's k, v [B, Hkv, L, D] (GQA: kv head j
    serves query heads j*rep .. j*rep+rep-1, read in place); ``mask`` [B, 1, S, L] (True = attend) or None, and
    ``causal`` as SDPA's is_causal.

    int8 codes c (x = scale * c + zp per kv head, ``qparams`` (k_scale, k_zp, v_scale, v_zp) as [1, Hkv, 1, 1]) are
    never dequantized: q . x_k = (scale_k q) . c_k + zp_k sum(q), and the second term is the same for every key
    of a query, so the softmax drops it; sum_n p_n x_v = scale_v (p . c_v) + zp_v, since the p sum to 1. The codes
    only change dtype (exact for int8): one pass over the cache where x = c * s + z took three.
    On the CPU the attention runs in float32 whatever the compute dtype: torch's CPU SDPA in bf16 is several
    times slower than in float32 for one query row.
    """
    dt = q.dtype
    work = torch.float32 if q.device.type == "cpu" else dt
    gqa = q.shape[1] != k.shape[1]
    if qparams is not None:  # per kv head, broadcast over its query heads: [B, Hkv, rep, S, D]
        ks, _, vs, vz = (p.unsqueeze(2) for p in qparams)  # [1, Hkv, 1, 1, 1]
        q = (q.unflatten(1, (k.shape[1], -1)).float() * ks).flatten(1, 2)
    o = F.scaled_dot_product_attention(q.to(work), k.to(work), v.to(work), attn_mask=mask, is_causal=causal,
                                       enable_gqa=gqa)
    if qparams is not None:
        o = (o.unflatten(1, (k.shape[1], -1)).float() * vs + vz).flatten(1, 2)
    return o.to(dt)
