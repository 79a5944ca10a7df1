"""The llama-family decoder on CUDA, built from the Triton kernels of runtime/cuda/kernels and GpuLinear.

Same interface as runtime/cpu/model.py's Transformer, ``forward(ids [B, S], pos [B, S], cache, last_only)``,
and the same maths; the residual stream is float32.

Prefill (any S): per layer RMSNorm, qkv, rope + cache write, SDPA, o, RMSNorm, w13, SiLU-mul, w2 (w13's
rows are gate/up pairs, convert/layout.interleave_pairs, so its output is too). When
every row writes positions 0..S-1, attention is SDPA with is_causal over the new K/V exactly as cached
(int8 round-tripped: x' = q * scale + zp, with per-head params or, online int8 / int4, per-token ones); otherwise
the cache is read back and masked (key position <= query position), as runtime/cpu/model.py does.

Decode (``decode_step``): one token per row on static buffers, no host work, so that runtime/cuda/graphs.py
captures it once per batch bucket. One row, or rows that are distinct sequences (six kernels per layer;
RuntimeOptions.attention):
    qkv GEMV (RMSNorm fused) -> rope + cache write + attention splits (kernels/attention_fused.py) -> merge
    -> o GEMV (+= residual) -> w13 GEMV (RMSNorm fused, SiLU-mul epilogue) -> w2 GEMV (+= residual)
A w13 that splits K (the mma kernel, after a norm kernel) adds its slices into fp32 sums instead, which the norm
kernel zeroed, and w2 applies the SiLU-mul to them as it loads its input: a last slice that waits for the others
(a fence, a counter, the sums read back) is slower (RuntimeOptions.silu_in_w2).
A qkv GEMM that splits K adds into an fp32 buffer that the fused kernel reads and the merge kernel zeroes.
Rows that may share a cache row (a short prompt prefilled as one step): rope + cache write, attention splits
and their merge are three kernels, so that every row's K/V is written before any row attends (the rope
kernel then reads and zeroes the split-K sums). Several rows take the tl.dot / tensor-core GEMMs after a
separate RMSNorm kernel, or the GEMV with a program per row (the kernel configs' choice per shape).
The model does not know about CUDA graphs: the CUDA runner captures ``decode_step``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...convert.workspace_config import WorkspaceConfig
from .kernels import HAVE_TRITON
from ..kv_cache import KVCache, shared_start
from ..cpu.model import LayerWeights, attention_mask
from ..options import RuntimeOptions
from ..rope import rotary_tables

if HAVE_TRITON:
    from .kernels.attention import decode_attention
    from .kernels.attention_fused import decode_attention_fused
    from .kernels.norm import rms_norm, silu_mul
    from .kernels.rope_cache import rope_cache_write
    from .kernels.kv_codes import hadamard_pm


def use_gpu_path(device: torch.device, dtype: torch.dtype, cfg: WorkspaceConfig) -> bool:
    """The Triton path runs on CUDA with fp16 / bf16 activations and a power-of-two head size >= 16 (the
    attention and rope kernels' tiles), and a KV sink of at most 16 positions; elsewhere runtime/cpu/model.py
    runs."""
    D = cfg.size_per_head
    return (device.type == "cuda" and HAVE_TRITON and dtype in (torch.float16, torch.bfloat16) and D >= 16
            and D & (D - 1) == 0 and cfg.kv_transform.sink <= 16)


class GpuTransformer(nn.Module):
    def __init__(self, cfg: WorkspaceConfig, glob: dict[str, torch.Tensor], layers: list[dict], max_len: int,
                 head: nn.Module | None = None):
        """``head``: the output projection as a GpuLinear (e.g. int4), replacing the dense one."""
        super().__init__()
        self.cfg, self.eps = cfg, cfg.norm_eps
        self.hq, self.hkv, self.d = cfg.head_num, cfg.kv_head_num, cfg.size_per_head
        self.tok_embeddings = nn.Parameter(glob["tok_embeddings.weight"], requires_grad=False)  # [V, hidden]
        self.norm = nn.Parameter(glob["norm.weight"], requires_grad=False)
        output = glob.get("output.weight")
        self.output = self.tok_embeddings if output is None else nn.Parameter(output, requires_grad=False)
        self.head = head
        if head is not None and output is not None:
            self.output = None  # the head replaces it
        self.layers = nn.ModuleList(LayerWeights(p) for p in layers)
        cos, sin = rotary_tables(cfg, max_len)  # [max_len, D] float32, read by the rope kernel at pos
        self.register_buffer("cos", cos.to(self.tok_embeddings.device), persistent=False)
        self.register_buffer("sin", sin.to(self.tok_embeddings.device), persistent=False)
        self.dtype = self.tok_embeddings.dtype
        self._kvp_src, self._kvp = None, None
        self._rot_src, self._rot_pm = None, None  # the cache's rotation, and the kernels' +-1 Hadamard of it

    def _transform(self, cache: KVCache, i: int) -> tuple | None:
        """Layer i's online-cache transform for the kernels (kv_codes.transform_args), or None."""
        if not cache.transformed:
            return None
        center = None if cache.k_centers is None else cache.k_centers[i].reshape(self.hkv, self.d)
        if cache.rot is not None and self._rot_src is not cache.rot:
            self._rot_src, self._rot_pm = cache.rot, hadamard_pm(cache.rot)
        return None if cache.rot is None else self._rot_pm, center, (cache.sk[i], cache.sv[i]) if cache.sink else None

    def kv_args(self, cache: KVCache) -> list[dict]:
        """Per layer, the kernels' cache arguments beside the K/V buffers: ``kv_params`` [4, Hkv] float32 (k_scale,
        k_zp, v_scale, v_zp) for a static int8 cache; ``token_params`` (k, v) [B, Hkv, S, 2] float16 for an
        online one (its per-token (scale, zp)) and its ``kv_transform`` (rotation, K centers, sink; or None);
        neither for fp16."""
        if cache.online:
            return [{"token_params": (cache.kp[i], cache.vp[i]), "kv_transform": self._transform(cache, i)}
                    for i in range(len(self.layers))]
        if cache.qparams is None:
            return [{}] * len(self.layers)
        if self._kvp_src is not cache.qparams:
            self._kvp = [{"kv_params": torch.stack([p.reshape(-1) for p in cache.qparams[i]]).contiguous()}
                         for i in range(len(self.layers))]
            self._kvp_src = cache.qparams
        return self._kvp

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """ids, pos: [B, S] -> logits [B, S, V] (or [B, 1, V] with ``last_only``) in the compute dtype: the
        prefill path (any S), eager kernels."""
        B, S = ids.shape
        T, H, I = B * S, self.cfg.hidden_units, self.cfg.inter_size
        assert int(pos.max()) < cache.max_len, f"position {int(pos.max())} is past the cache ({cache.max_len})"
        start = shared_start(pos)
        kv = self.kv_args(cache)
        dev = ids.device
        pos_t = pos.reshape(T).contiguous()
        slot = torch.arange(B, device=dev).repeat_interleave(S)  # cache row of each token
        x = F.embedding(ids.reshape(T), self.tok_embeddings).float()  # [T, hidden] fp32 residual
        h = torch.empty(T, H, device=dev, dtype=self.dtype)
        a = torch.empty(T, I, device=dev, dtype=self.dtype)
        for i, blk in enumerate(self.layers):
            qkv = blk.wqkv(rms_norm(x, blk.attention_norm, self.eps, h))  # [T, (Hq + 2 Hkv) * D]
            rope_cache_write(qkv, pos_t, slot, self.cos, self.sin, cache.k[i], cache.v[i], self.hq, self.hkv,
                             q_norm=blk.q_norm, k_norm=blk.k_norm, eps=self.eps, write_back=True, **kv[i])
            x.add_(blk.wo(self._attend(qkv, pos, start, cache, i)))
            gu = blk.w13(rms_norm(x, blk.ffn_norm, self.eps, h))  # [T, 2 * inter]
            x.add_(blk.w2(silu_mul(gu, a, pairs=True)))
        if last_only:
            x = x.view(B, S, H)[:, -1]  # [B, hidden]
            S = 1
        hn = rms_norm(x, self.norm, self.eps, torch.empty(x.shape, device=dev, dtype=self.dtype))
        logits = F.linear(hn, self.output) if self.head is None else self.head(hn)
        return logits.view(B, S, -1)

    def _attend(self, qkv: torch.Tensor, pos: torch.Tensor, start: int | None, cache: KVCache, i: int) -> torch.Tensor:
        """qkv [T, ...] after rope/write-back -> attention output [T, Hq * D]."""
        B, S = pos.shape
        hq, hkv, D = self.hq, self.hkv, self.d
        rep = hq // hkv  # GQA: kv head j serves query heads j*rep .. j*rep+rep-1
        q = qkv[:, :hq * D].view(B, S, hq, D).transpose(1, 2)  # [B, Hq, S, D]
        if start == 0:  # fresh rows: the new K/V are the whole context
            k = qkv[:, hq * D:(hq + hkv) * D].view(B, S, hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
            v = qkv[:, (hq + hkv) * D:].view(B, S, hkv, D).transpose(1, 2)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a cached prefix or per-row positions: key position <= query position
            length = int(pos.max()) + 1
            k, v = cache.read(i, B, length)  # [B, Hkv, L, D] in the compute dtype
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            mask, causal = attention_mask(pos, start, length)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return o.transpose(1, 2).reshape(B * S, hq * D)

    # ------------------------------------------------------------------------------------------
    def decode_step(self, bufs, b: int, cache: KVCache, opts: RuntimeOptions, distinct: bool = False,
                    short: bool = False) -> None:
        """One token for rows 0..b-1 of the static buffers ``bufs`` (runtime/cuda_graph.DecodeBuffers):
        reads bufs.idx[:, :b] (token, position, cache row; position < 0 = padding) and leaves the
        next-token logits in bufs.logits[:b]. ``distinct``: the rows are distinct sequences (cache rows), so no
        row reads another's new K/V and the fused attention serves them all. ``short``: every row holds at most
        opts.short_context keys; the fused attention's last split to finish then merges (as attention "one"):
        no merge kernel. ``opts``: the kernel choices (attention mode and tiles, where w13's SiLU-mul happens).
        Launches kernels only: safe to capture in a CUDA graph."""
        idx = bufs.idx[:, :b]
        ids, pos, slot = idx[0], idx[1], idx[2]
        x = bufs.x[:b]  # [b, hidden] fp32 residual
        torch.index_select(self.tok_embeddings, 0, ids, out=bufs.emb[:b])
        x.copy_(bufs.emb[:b])
        qkv, attn, ffn = bufs.qkv[:b], bufs.attn[:b], bufs.ffn[:b]
        kv = self.kv_args(cache)
        for i, blk in enumerate(self.layers):
            acc = bufs.qkv_acc[:b] if blk.wqkv.accumulates(b) else None  # split-K sums (zeroed after reading)
            blk.wqkv.run(x, qkv if acc is None else acc, prologue="rmsnorm", norm_weight=blk.attention_norm,
                         eps=self.eps, epilogue="store" if acc is None else "residual")
            if (b == 1 or distinct) and opts.attention != "three":
                # rotary, cache write, attention; split-K qkv sums are read here and zeroed by whoever merges
                decode_attention_fused(qkv if acc is None else acc, pos, slot, self.cos, self.sin, cache.k[i],
                                       cache.v[i], self.hq, attn, q_norm=blk.q_norm, k_norm=blk.k_norm, eps=self.eps,
                                       scratch=bufs.parts[b], splits=bufs.splits[b], count=bufs.count,
                                       merge=short or opts.attention == "one",
                                       sums=acc is not None, **opts.attention_kw, **kv[i])
            else:  # rows may share a cache row (a prompt's tokens): every K/V is written before any row attends
                rope_cache_write(qkv, pos, slot, self.cos, self.sin, cache.k[i], cache.v[i], self.hq, self.hkv,
                                 q_norm=blk.q_norm, k_norm=blk.k_norm, eps=self.eps, acc=acc, **kv[i])
                decode_attention(qkv, pos, slot, cache.k[i], cache.v[i], self.hq, attn, scratch=bufs.parts[b],
                                 splits=bufs.splits[b], **kv[i])
            blk.wo.run(attn, x, epilogue="residual")
            if opts.silu_in_w2 and blk.w13.accumulates(b):  # w13's K-slices add into fp32 sums (zeroed by its norm
                # kernel) and w2's kernel takes the SiLU-mul of them: no slice waits for the others
                gu = bufs.ffn_sums[0][:b]
                blk.w13.run(x, gu, prologue="rmsnorm", norm_weight=blk.ffn_norm, eps=self.eps, epilogue="accumulate")
                blk.w2.run(gu, x, prologue="silu", epilogue="residual")
            else:
                blk.w13.run(x, ffn, prologue="rmsnorm", norm_weight=blk.ffn_norm, eps=self.eps, epilogue="silu",
                            sums=bufs.ffn_sums)
                blk.w2.run(ffn, x, epilogue="residual")
        if self.head is not None:  # final RMSNorm fused into the head's GEMV
            self.head.run(x, bufs.logits[:b], prologue="rmsnorm", norm_weight=self.norm, eps=self.eps)
            return
        rms_norm(x, self.norm, self.eps, bufs.h[:b])
        torch.mm(bufs.h[:b], self.output.t(), out=bufs.logits[:b])
