"""AWQ on one decoder block: capture its inputs, search and fold scales and clips, pack its weights.

Per decoder block (only that block on the accelerator):
  [STEP 1] one full-precision forward over all windows; it records each scale group's input and
           gives the next block's input
  [STEP 2] per scale group, grid-search the per-channel scale (output MSE of the inspected module)
  [STEP 3] fold the best scales into the block, then search per-group clipping (not q/k)
  [STEP 4] quantize and pack; the block's search results are saved, so a killed run resumes
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..convert.arch import ArchSpec, ScaleGroup, get_module
from ..convert.awq_export import quantize_linear
from .awq_request import AwqRequest
from .awq_search import apply_clip, apply_scale, scale_candidates, search_clip, search_scale, w_mean_of
from .stats import ChannelStats


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


class Captured:
    """What one block's full-precision forward leaves for the search, per input group (keyed by the
    group's first linear): running |x| statistics, every ``step``-th token for the clip search, and
    the full input only where a scale search must run the inspected module on it."""

    def __init__(self, keep_full: set[str], tokens: int, clip_samples: int):
        self.keep_full, self.step = keep_full, max(1, tokens // clip_samples)
        self.limit = clip_samples
        self.full: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, ChannelStats] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.seen: dict[str, int] = {}

    def record(self, key: str, x: torch.Tensor) -> None:
        s = ChannelStats.of(x)
        self.stats[key] = self.stats[key].merge(s) if key in self.stats else s
        flat = x.reshape(-1, x.shape[-1])
        seen = self.seen.get(key, 0)
        first = (-seen) % self.step  # global token indices that are multiples of step
        self.samples.setdefault(key, []).append(flat[first::self.step].clone())
        self.seen[key] = seen + flat.shape[0]
        if key in self.keep_full:
            self.full.setdefault(key, []).append(x)

    def sampled(self, key: str) -> torch.Tensor:
        return torch.cat(self.samples[key])[: self.limit]  # [n, in]


def full_input_keys(block, spec: ArchSpec) -> set[str]:
    """Inputs a scale search needs whole: those read by an inspected module (attention, MLP), and o's
    input when v -> o can be scaled. down's input is rebuilt from the MLP input chunk by chunk."""
    keys = {spec.q_proj, spec.gate_proj}
    v, o = get_module(block, spec.v_proj), get_module(block, spec.o_proj)
    if v.weight.shape[0] == o.weight.shape[1]:
        keys.add(spec.o_proj)
    return keys


def capture_inputs(block, spec: ArchSpec, tokens: int, clip_samples: int):
    """Hooks feeding a Captured from the block's forward; returns (captured, remove)."""
    cap = Captured(full_input_keys(block, spec), tokens, clip_samples)
    handles = [get_module(block, g[0]).register_forward_pre_hook(lambda _m, args, key=g[0]: cap.record(key, args[0]))
               for g in spec.input_groups]
    return cap, lambda: [h.remove() for h in handles]


def _mlp_hidden(block, spec: ArchSpec, x: torch.Tensor) -> torch.Tensor:
    """down_proj's input from the MLP input: act(gate(x)) * up(x) (SwiGLU, every supported arch)."""
    mlp = get_module(block, spec.mlp)
    return mlp.act_fn(get_module(block, spec.gate_proj)(x)) * get_module(block, spec.up_proj)(x)


def _chunks(xs: list[torch.Tensor], max_tokens: int = 8192):
    """Split stored [b, S, C] batches into pieces of at most ~max_tokens tokens (bounds transient memory)."""
    for x in xs:
        yield from x.split(max(1, max_tokens // x.shape[1]))


@torch.inference_mode()
def search_block(block, spec: ArchSpec, cap: Captured, pe, req: AwqRequest) -> tuple[dict, dict]:
    """[STEP 2-3] on one block; returns (tensors, report). Scales and clips are applied to ``block``."""
    tensors, report = {}, {"groups": [], "clips": {}}
    first = {name: group[0] for group in spec.input_groups for name in group}
    for group in spec.scale_groups:
        if not req.search_scale:
            break
        lins = [get_module(block, n) for n in group.linears]
        prev = get_module(block, group.prev_op)
        key = first[group.linears[0]]
        if group.needs_square and key not in cap.full:
            continue  # v -> o with GQA: v's outputs are not o's inputs one-to-one
        stats = cap.stats[key]
        x_mean = stats.abssum / stats.count  # mean |x| per input channel
        cands, alphas = scale_candidates(x_mean, w_mean_of([m.weight for m in lins], req.group_size), req.n_grid)
        forward = _forward_fn(block, spec, group, pe)
        weights = {f"{n}.weight": m.weight for n, m in zip(group.linears, lins)}
        if key in cap.full:
            chunks = lambda: _chunks(cap.full[key])  # noqa: E731
        else:  # down: rebuilt from the (already rescaled) MLP input, one chunk at a time
            chunks = lambda: (_mlp_hidden(block, spec, x) for x in _chunks(cap.full[spec.gate_proj]))  # noqa: E731
        losses = search_scale(forward, chunks(), weights, cands, req.q).cpu()
        best = int(torch.argmin(losses))
        s = cands[best]
        apply_scale(block, prev, lins, s)
        # the recorded input now feeds scaled weights: x -> x / s (each input feeds one group only)
        for x in cap.full.get(key, []):
            x.div_(s.to(x.dtype))
        cap.samples[key] = [x / s.to(x.dtype) for x in cap.samples[key]]
        tensors[f"scale.{group.prev_op}"] = s.float().cpu()
        report["groups"].append({"prev_op": group.prev_op, "linears": list(group.linears),
                                 "alpha": alphas[best], "mse": float(losses[best]),
                                 "mse_no_scale": float(losses[-1])})
    if req.clip:
        for name in spec.linears:
            if name in (spec.q_proj, spec.k_proj):
                continue  # q and k meet in q.k^T: clipping them is hard to judge by their own output
            lin = get_module(block, name)
            clip_max, ratio = search_clip(lin.weight, cap.sampled(first[name]), req.q, req.n_grid)
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
