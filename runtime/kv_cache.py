"""Static, preallocated KV cache: one [B, H_kv, S_max, D] buffer per layer for K and for V (convert/kv_mode.py).

kv_mode fp16 stores K (post-rotary) and V in the compute dtype. int8-static (quant_policy 4) stores them as int8
with static per-head params, q = clamp(round((x - zp) / scale), -128, 127), and reads x = q * scale + zp.
The online modes int8 and int4 store uint8 codes (int4: two per byte, [B, H_kv, S_max, D/2]) and, per layer, one
float16 (scale, zp) per (token, head) for K and for V, [B, H_kv, S_max, 2], taken as the token is written
(convert/quant.py kv_token_quantize). Every row of the batch is its own sequence: writes go to the positions each
row names.

An online cache may transform each token first (convert/kv_mode.py KVTransform; int4 in new workspaces): it stores
x' = (x - c) R (convert/quant.py kv_rotate; c for K only), so attention runs in the rotated space: q R against the
stored keys, and the output o' R back (R R = I). With ``sink`` the first positions' x' are also held in the compute
dtype, [B, H_kv, sink, D] per layer, and attention reads them from there instead of from their codes.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..convert.quant import (kv_dequantize, kv_quantize, kv_rotate, kv_token_dequantize, kv_token_quantize,
                             kv_unrotate, pack_int4_pairs, unpack_int4_pairs)

ALGEBRA_ROWS = 16  # online modes: up to this many query positions attend over the codes; more dequantize for SDPA


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device,
                 qparams: dict[int, tuple[torch.Tensor, ...]] | None = None, online_bits: int | None = None,
                 rot: torch.Tensor | None = None, k_centers: dict[int, torch.Tensor] | None = None, sink: int = 0):
        """``qparams``: int8-static; ``online_bits`` 8 or 4: the online modes; neither: fp16 (compute dtype).
        Online modes' transform: ``rot`` R [D, D] or None, ``k_centers`` {layer: c [H_kv, D]} or None, ``sink``."""
        assert qparams is None or online_bits is None, "a cache is static int8 or online, not both"
        assert online_bits in (None, 8, 4), f"online_bits {online_bits}"
        assert online_bits or (rot is None and k_centers is None and not sink), "a transform needs an online mode"
        self.dtype, self.max_len, self.batch, self.bits = dtype, max_len, batch, online_bits
        store = torch.int8 if qparams is not None else torch.uint8 if online_bits else dtype
        width = head_dim * online_bits // 8 if online_bits else head_dim  # int4: [D] -> [D/2] bytes
        shape = (batch, kv_heads, max_len, width)
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        # online modes, per layer: [B, H_kv, S_max, 2] float16, (scale, zp) of each token's K / V
        pshape = (batch, kv_heads, max_len, 2)
        self.kp = [torch.zeros(pshape, dtype=torch.float16, device=device) for _ in range(num_layers)] \
            if online_bits else None
        self.vp = [torch.zeros(pshape, dtype=torch.float16, device=device) for _ in range(num_layers)] \
            if online_bits else None
        self.rot = None if rot is None else rot.to(device=device, dtype=torch.float32)  # [D, D]
        self.k_centers = None if k_centers is None else {  # [H_kv, D] -> [1, H_kv, 1, D] float32
            i: c.to(device=device, dtype=torch.float32)[None, :, None] for i, c in k_centers.items()}
        self.sink = sink  # per layer: [B, H_kv, sink, D] compute dtype, x' of positions 0..sink-1
        self.sk = [torch.zeros(batch, kv_heads, sink, head_dim, dtype=dtype, device=device)
                   for _ in range(num_layers)] if sink else None
        self.sv = [torch.zeros(batch, kv_heads, sink, head_dim, dtype=dtype, device=device)
                   for _ in range(num_layers)] if sink else None
        # per layer (k_scale, k_zp, v_scale, v_zp), each [H_kv] -> [1, H_kv, 1, 1] float32
        self.qparams = None if qparams is None else {
            i: tuple(p.to(device=device, dtype=torch.float32)[None, :, None, None] for p in ps)
            for i, ps in qparams.items()}

    @property
    def quantized(self) -> bool:
        """Static int8 (per-head params); see ``online`` for the per-token modes."""
        return self.qparams is not None

    @property
    def online(self) -> bool:
        return self.bits is not None

    @property
    def mode(self) -> str:
        """convert/kv_mode.py's name of what this cache stores."""
        return "int8-static" if self.quantized else f"int{self.bits}" if self.online else "fp16"

    @property
    def transformed(self) -> bool:
        return self.rot is not None or self.k_centers is not None or self.sink > 0

    def nbytes(self) -> int:
        """Bytes of every buffer, per-token params and the sink's positions included."""
        extra = (self.kp + self.vp if self.online else []) + (self.sk + self.sv if self.sink else [])
        return sum(t.numel() * t.element_size() for t in self.k + self.v + extra)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares this one's storage (views, no copy):
        a server prefills one sequence's row, or decodes a run of rows, through the same forward."""
        assert 0 <= start < stop <= self.batch, f"rows {start}..{stop - 1} of a cache of {self.batch}"
        view = copy.copy(self)  # dtype, max_len, qparams shared
        view.batch = stop - start
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        if self.online:
            view.kp = [t[start:stop] for t in self.kp]
            view.vp = [t[start:stop] for t in self.vp]
        if self.sink:
            view.sk = [t[start:stop] for t in self.sk]
            view.sv = [t[start:stop] for t in self.sv]
        return view

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | None) -> None:
        """pos: [B, S] positions; k, v: [B, H_kv, S, D] (k after rotary).

        ``start``: when every row writes positions start..start+S-1 (see ``shared_start``), a slice copy.
        """
        if self.qparams is not None:
            ks, kz, vs, vz = self.qparams[layer]
            k, v = kv_quantize(k, ks, kz), kv_quantize(v, vs, vz)
        if self.transformed:  # x' = (x - c) R, float32; the sink's positions also kept as they are
            k = kv_rotate(k, self.rot, None if self.k_centers is None else self.k_centers[layer])
            v = kv_rotate(v, self.rot)
            if self.sink:
                _put_sink(self.sk[layer], pos, k, start)
                _put_sink(self.sv[layer], pos, v, start)
        if self.online:  # each token's codes and its (scale, zp), per head
            k, kp = self._quantize_tokens(k)
            v, vp = self._quantize_tokens(v)
            _put(self.kp[layer], pos, kp, start)
            _put(self.vp[layer], pos, vp, start)
        _put(self.k[layer], pos, k, start)
        _put(self.v[layer], pos, v, start)

    def _quantize_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, H, S, D] -> (codes [B, H, S, D * bits / 8] uint8, params [B, H, S, 2] float16 (scale, zp))."""
        codes, scale, zp = kv_token_quantize(x, self.bits)
        if self.bits == 4:
            codes = pack_int4_pairs(codes)  # [..., D] -> [..., D/2]
        return codes, torch.stack((scale, zp), dim=-1).half()

    def codes(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, ...]:
        """Online modes: (k codes [batch, H, length, D] uint8, k params [batch, H, length, 2], v codes, v params);
        int4 codes unpacked."""
        k, v = self.stored(layer, batch, length)
        if self.bits == 4:
            k, v = unpack_int4_pairs(k), unpack_int4_pairs(v)
        return k, self.kp[layer][:batch, :, :length], v, self.vp[layer][:batch, :, :length]

    def stored(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first ``length`` positions as stored (codes in the quantized modes): views, no copy."""
        return self.k[layer][:batch, :, :length], self.v[layer][:batch, :, :length]

    def read(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first ``length`` positions: [batch, H_kv, length, D] in the compute dtype."""
        if self.transformed:  # back from the stored x' = (x - c) R
            k, v = self._dequantized(layer, batch, length, torch.float32)
            c = None if self.k_centers is None else self.k_centers[layer]
            return kv_unrotate(k, self.rot, c).to(self.dtype), kv_unrotate(v, self.rot).to(self.dtype)
        if self.online:
            return self._dequantized(layer, batch, length, self.dtype)
        k, v = self.stored(layer, batch, length)
        if self.qparams is None:
            return k, v
        ks, kz, vs, vz = self.qparams[layer]
        return kv_dequantize(k, ks, kz, self.dtype), kv_dequantize(v, vs, vz, self.dtype)

    def _dequantized(self, layer: int, batch: int, length: int, dtype: torch.dtype):
        """Online modes: the stored K, V of the first ``length`` positions as values ([batch, H_kv, length, D], x'
        where transformed), the sink's positions from their own buffer."""
        kc, kp, vc, vp = self.codes(layer, batch, length)
        k = kv_token_dequantize(kc, kp[..., 0], kp[..., 1], dtype)
        v = kv_token_dequantize(vc, vp[..., 0], vp[..., 1], dtype)
        n = min(self.sink, length)
        if n:
            k[:, :, :n], v[:, :, :n] = self.sk[layer][:batch, :, :n], self.sv[layer][:batch, :, :n]
        return k, v

    def attention(self, layer: int, q: torch.Tensor, length: int, mask: torch.Tensor | None,
                  causal: bool) -> torch.Tensor:
        """q [B, Hq, S, D] attends over this layer's first ``length`` positions (see cache_attention)."""
        B = q.shape[0]
        if not self.online:
            k, v = self.stored(layer, B, length)
            return cache_attention(q, k, v, mask, causal, self.qparams[layer] if self.quantized else None)
        dt = q.dtype
        if self.rot is not None:  # scores in the rotated space: (q R) . k'
            q = q.float() @ self.rot
        if q.shape[2] <= ALGEBRA_ROWS:
            n = min(self.sink, length)
            sink = (self.sk[layer][:B, :, :n], self.sv[layer][:B, :, :n]) if n else None
            o = token_cache_attention(q, *self.codes(layer, B, length), mask, causal, sink)
        else:  # a long prefill: dequantized once for SDPA's fused kernel
            o = cache_attention(q, *self._dequantized(layer, B, length, self.dtype), mask, causal)
        return (o if self.rot is None else o.float() @ self.rot).to(dt)  # o = o' R


def _put(buf: torch.Tensor, pos: torch.Tensor, x: torch.Tensor, start: int | None) -> None:
    """buf [B_max, H, S_max, X] at positions pos [B, S] <- x [B, H, S, X]."""
    B, S = pos.shape
    if start is not None:
        buf[:B, :, start:start + S] = x
    else:
        rows = torch.arange(B, device=pos.device)[:, None]  # [B, 1] with pos [B, S] -> [B, S, H, X]
        buf[rows, :, pos] = x.transpose(1, 2)


def _put_sink(buf: torch.Tensor, pos: torch.Tensor, x: torch.Tensor, start: int | None) -> None:
    """buf [B_max, H, n, D] <- the tokens of x [B, H, S, D] whose positions pos [B, S] are below n."""
    n = buf.shape[2]
    if start is not None:
        if start < n:
            m = min(n, start + pos.shape[1]) - start
            buf[:pos.shape[0], :, start:start + m] = x[:, :, :m]
        return
    rows, cols = (pos < n).nonzero(as_tuple=True)  # [T] each: the (row, column) of every token below n
    if rows.numel():
        buf[rows, :, pos[rows, cols]] = x[rows, :, cols]


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


def token_cache_attention(q: torch.Tensor, kc: torch.Tensor, kp: torch.Tensor, vc: torch.Tensor, vp: torch.Tensor,
                          mask: torch.Tensor | None, causal: bool = False,
                          sink: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """cache_attention over online codes: q [B, Hq, S, D]; kc, vc [B, Hkv, L, D] codes; kp, vp [B, Hkv, L, 2]
    (scale, zp) per key. The same algebra as the static path, with the params per key instead of per head:
    q . x_t = s_t (q . c_t) + z_t sum(q) (z_t now differs between keys, so it stays), and
    sum_t p_t x_t = (p s) . c + p . z. The codes only change dtype; nothing [L, D] is dequantized.
    ``sink``: (k, v) [B, Hkv, n, D] values of keys 0..n-1, read instead of their codes."""
    dt = q.dtype
    B, Hq, S, D = q.shape
    Hkv = kc.shape[1]
    qg = q.float().unflatten(1, (Hkv, -1)).flatten(2, 3)  # [B, Hq, S, D] -> [B, Hkv, rep * S, D]
    ks, kz = kp.float().unbind(-1)  # [B, Hkv, L] each
    vs, vz = vp.float().unbind(-1)
    scores = (qg @ kc.float().transpose(-1, -2)) * ks[:, :, None] + qg.sum(-1, keepdim=True) * kz[:, :, None]
    n = 0 if sink is None else sink[0].shape[2]
    if n:  # [B, Hkv, rep * S, n]
        scores[..., :n] = qg @ sink[0].float().transpose(-1, -2)
    scores = (scores / math.sqrt(D)).unflatten(2, (-1, S))  # [B, Hkv, rep, S, L]
    L = kc.shape[2]
    if causal:  # as SDPA's is_causal: query s sees keys 0..s
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril()[None, None]
    if mask is not None:  # [B, 1, S, L] -> [B, 1, 1, S, L]
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = scores.softmax(-1).flatten(2, 3)  # [B, Hkv, rep * S, L]
    pc = p if not n else torch.cat((torch.zeros_like(p[..., :n]), p[..., n:]), -1)  # the codes' share
    o = (pc * vs[:, :, None]) @ vc.float() + (pc * vz[:, :, None]).sum(-1, keepdim=True)  # [B, Hkv, rep * S, D]
    if n:
        o = o + p[..., :n] @ sink[1].float()
    return o.unflatten(2, (-1, S)).flatten(1, 2).to(dt)  # [B, Hq, S, D]
