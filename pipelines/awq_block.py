"""AWQ on one decoder block: capture its inputs, search and fold scales and clips, pack its weights.

Per decoder block (only that block on the accelerator):
  [STEP 1] one full-precision forward over all windows; it records each scale group's input and
           gives the next block's input
  [STEP 2] per scale group, grid-search the per-channel scale (output MSE of the inspected module)
  [STEP 3] fold the best scales into the block, then search per-group clipping (not q/k)
  [STEP 4] quantize and pack; the block's search results are saved, so a killed run resumes
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..convert.arch import ArchSpec, ScaleGroup, get_module
from ..convert.awq_export import quantize_linear
from .awq_search import apply_clip, apply_scale, scale_candidates, search_clip, search_scale, w_mean_of
from .stats import ChannelStats

if TYPE_CHECKING:
    from .awq import AwqRequest


def _forward_fn(block, spec: ArchSpec, group: ScaleGroup, position_embeddings):
    """forward(x, overrides) of the module the group's loss is measured on; overrides use block names."""
    if group.inspect is None:
        lin = get_module(block, group.linears[0])
        name = group.linears[0] + ".weight"
        return lambda x, ov: F.linear(x, ov[name], lin.bias)
    mod = get_module(block, group.inspect)
    prefix = group.inspect + "."
    kwargs = {"position_embeddings": position_embeddings, "attention_mask": None} if group.inspect == spec.attn else {}

    def forward(x, ov):
        out = torch.func.functional_call(mod, {k[len(prefix):]: v for k, v in ov.items()}, (x,), kwargs)
        return out[0] if isinstance(out, tuple) else out
    return forward


def capture_inputs(block, spec: ArchSpec):
    """Hooks storing every chunk of each scale group's input; returns (store, remove)."""
    store: dict[str, list] = {}
    handles = []
    for group in spec.input_groups:
        def hook(_m, args, key=group[0]):
            store.setdefault(key, []).append(args[0])
        handles.append(get_module(block, group[0]).register_forward_pre_hook(hook))
    return store, lambda: [h.remove() for h in handles]


@torch.no_grad()
def search_block(block, spec: ArchSpec, inputs: dict[str, list], pe, req: AwqRequest) -> tuple[dict, dict]:
    """[STEP 2-3] on one block; returns (tensors, report). Scales and clips are applied to ``block``."""
    tensors, report = {}, {"groups": [], "clips": {}}
    first = {name: group[0] for group in spec.input_groups for name in group}
    for group in spec.scale_groups:
        if not req.search_scale:
            break
        lins = [get_module(block, n) for n in group.linears]
        prev = get_module(block, group.prev_op)
        if group.needs_square and prev.weight.shape[0] != lins[0].weight.shape[1]:
            continue  # v -> o with GQA: v's outputs are not o's inputs one-to-one
        xs = inputs[first[group.linears[0]]]
        stats = ChannelStats.of(xs[0])
        for x in xs[1:]:
            stats = stats.merge(ChannelStats.of(x))
        x_mean = stats.abssum / stats.count  # mean |x| per input channel
        cands, alphas = scale_candidates(x_mean, w_mean_of([m.weight for m in lins], req.group_size), req.n_grid)
        forward = _forward_fn(block, spec, group, pe)
        weights = {f"{n}.weight": m.weight for n, m in zip(group.linears, lins)}
        refs = [forward(x, weights) for x in xs]
        losses = search_scale(forward, xs, refs, weights, cands, req.q).cpu()
        best = int(torch.argmin(losses))
        s = cands[best]
        apply_scale(block, prev, lins, s)
        # the recorded input now feeds scaled weights: x -> x / s (each input feeds one group only)
        inputs[first[group.linears[0]]] = [x / s.to(x.dtype) for x in xs]
        tensors[f"scale.{group.prev_op}"] = s.float().cpu()
        report["groups"].append({"prev_op": group.prev_op, "linears": list(group.linears),
                                 "alpha": alphas[best], "mse": float(losses[best]),
                                 "mse_no_scale": float(losses[-1])})
    if req.clip:
        for name in spec.linears:
            if name in (spec.q_proj, spec.k_proj):
                continue  # q and k meet in q.k^T: clipping them is hard to judge by their own output
            lin = get_module(block, name)
            x = torch.cat([c.reshape(-1, c.shape[-1]) for c in inputs[first[name]]])  # [tokens, in]
            step = max(1, x.shape[0] // req.clip_samples)
            clip_max, ratio = search_clip(lin.weight, x[::step][: req.clip_samples], req.q, req.n_grid)
            del x
            apply_clip(lin, clip_max)
            tensors[f"clip.{name}"] = clip_max.float().cpu()
            report["clips"][name] = float(ratio.mean())
    return tensors, report


@torch.no_grad()
def replay_block(block, tensors: dict[str, torch.Tensor], spec: ArchSpec) -> None:
    """Apply saved search results to a block (resume, and the deterministic path to export)."""
    for group in spec.scale_groups:
        key = f"scale.{group.prev_op}"
        if key in tensors:
            apply_scale(block, get_module(block, group.prev_op), [get_module(block, n) for n in group.linears],
                        tensors[key].to(next(block.parameters()).device))
    for name in spec.linears:
        if f"clip.{name}" in tensors:
            apply_clip(get_module(block, name), tensors[f"clip.{name}"].to(next(block.parameters()).device))


def pack_block(block, prefix: str, spec: ArchSpec, req: AwqRequest) -> dict[str, torch.Tensor]:
    """[STEP 4] checkpoint tensors of one (scaled, clipped) block: packed linears, fp16 everything else."""
    out = {}
    linears = set(spec.linears)
    for name, t in block.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if mod in linears and name.endswith(".weight"):
            for k, v in quantize_linear(t, req.bits, req.group_size, req.sym).items():
                out[f"{prefix}.{mod}.{k}"] = v.cpu()
        else:
            out[f"{prefix}.{name}"] = t.half().cpu()
    return out
