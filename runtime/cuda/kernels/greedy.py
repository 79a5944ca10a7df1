"""Greedy decoding's bookkeeping between two captured decode steps, in one kernel.

For each row b of a step's logits [B, V]: tok = argmax (the first index of the maximum, as torch.argmax), then
    next_tok[b] = tok;  idx[0, b] = tok;  idx[1, b] += 1 unless it is < 0 (padding);  ring[b] = tok (if given)
so that the next replay feeds tok at the next position. Program (b, p) takes slice p of the row; the last
of a row's P programs to finish (a counter per row, reset by it) merges their (max, index) pairs, where torch
ops would take five kernels (argmax in two passes, a copy, the position update, the ring copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, pdl
from .arrive import _last_to_arrive

SLICES = 64  # programs per row


@triton.jit
def _greedy_kernel(logits_ptr, stride_l, V, idx_ptr, stride_idx, tok_ptr, ring_ptr, val_ptr, arg_ptr, cnt_ptr,
                   P: tl.constexpr, BLOCK: tl.constexpr, HAS_RING: tl.constexpr, FENCE: tl.constexpr,
                   PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b, p = tl.program_id(0), tl.program_id(1)
    per = tl.cdiv(V, P)
    offs = p * per + tl.arange(0, BLOCK)
    ok = (offs < V) & (offs < (p + 1) * per)
    x = tl.load(logits_ptr + b * stride_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    a = tl.min(tl.where(x == m, offs, 2147483647), axis=0)  # the first index of the maximum
    tl.store(val_ptr + b * P + p, m)
    tl.store(arg_ptr + b * P + p, a)
    if _last_to_arrive(cnt_ptr + b, P, FENCE):  # every slice's maximum is in
        j = tl.arange(0, P)
        vals = tl.load(val_ptr + b * P + j, cache_modifier=".cg")
        args = tl.load(arg_ptr + b * P + j, cache_modifier=".cg")
        big = tl.max(vals, axis=0)
        tok = tl.min(tl.where(vals == big, args, 2147483647), axis=0).to(tl.int64)
        tl.store(tok_ptr + b, tok)
        tl.store(idx_ptr + b, tok)
        pos = tl.load(idx_ptr + stride_idx + b)
        tl.store(idx_ptr + stride_idx + b, tl.where(pos >= 0, pos + 1, pos))
        if HAS_RING:
            tl.store(ring_ptr + b, tok)


def scratch(rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values float32 [rows, SLICES], indices int32 [rows, SLICES], counters int32 [rows], zero)."""
    return (torch.empty(rows, SLICES, device=device), torch.empty(rows, SLICES, device=device, dtype=torch.int32),
            torch.zeros(rows, device=device, dtype=torch.int32))


def greedy_feed(logits: torch.Tensor, idx: torch.Tensor, next_tok: torch.Tensor, ring: torch.Tensor | None,
                work: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """logits [B, V]; idx int64 [3, >= B] (token, position, cache row); next_tok int64 [>= B]; ring: int64
    [>= B] or None; work: scratch(rows >= B)."""
    B, V = logits.shape
    val, arg, cnt = work
    assert logits.stride(-1) == 1 and idx.dtype == next_tok.dtype == torch.int64 and idx.stride(-1) == 1
    assert val.shape[0] >= B and val.shape[1] == SLICES and cnt.shape[0] >= B
    assert ring is None or (ring.dtype == torch.int64 and ring.stride(-1) == 1)
    block = triton.next_power_of_2(triton.cdiv(V, SLICES))
    on = pdl(logits)
    _greedy_kernel[(B, SLICES)](logits, logits.stride(0), V, idx, idx.stride(0), next_tok,
                                ring if ring is not None else next_tok, val, arg, cnt, P=SLICES, BLOCK=block,
                                HAS_RING=ring is not None, FENCE=not INTERPRET, PDL=on, num_warps=4, launch_pdl=on)
