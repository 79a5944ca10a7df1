"""Per-architecture layer maps: the one place where model families differ.

A new architecture is a new ``ARCHS`` entry, never a new ``if`` elsewhere.
Module names are relative to one decoder block unless they say otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import QconvError


@dataclass(frozen=True, slots=True)
class ScaleGroup:
    """Linears that read one input, and the op that produces it (AWQ folds scales into ``prev_op``).

    ``inspect`` is the module whose output the AWQ search compares (the smallest one that
    contains every linear of the group); ``None`` means the single linear itself.
    """

    prev_op: str
    linears: tuple[str, ...]
    inspect: str | None = None
    # v -> o can only be scaled when v's output channels are o's input channels (no GQA).
    needs_square: bool = False


@dataclass(frozen=True, slots=True)
class ArchSpec:
    model_type: str
    # Whole-model paths.
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    # Per-block paths.
    attn: str = "self_attn"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    # Per-head RMSNorm on q and k before rotary (qwen3).
    q_norm: str | None = None
    k_norm: str | None = None
    # Default for q/k/v bias when the config does not say (``attention_bias``).
    qkv_bias: bool = False
    mlp: str = "mlp"
    rope_style: str = "neox"  # rotate_half over [x1, x2] halves, as transformers' llama family does

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                self.gate_proj, self.up_proj, self.down_proj)

    @property
    def scale_groups(self) -> tuple[ScaleGroup, ...]:
        """AWQ's norm -> linears groups: input norm -> q,k,v; v -> o; post-attn norm -> gate,up; up -> down."""
        return (
            ScaleGroup(self.input_norm, (self.q_proj, self.k_proj, self.v_proj), self.attn),
            ScaleGroup(self.v_proj, (self.o_proj,), None, needs_square=True),
            ScaleGroup(self.post_attn_norm, (self.gate_proj, self.up_proj), self.mlp),
            ScaleGroup(self.up_proj, (self.down_proj,)),
        )

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears grouped by the tensor they read; statistics are gathered once per group."""
        return ((self.q_proj, self.k_proj, self.v_proj), (self.o_proj,),
                (self.gate_proj, self.up_proj), (self.down_proj,))


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2", qkv_bias=True),
    "qwen3": ArchSpec("qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
}


def get_arch(model_type: str | None) -> ArchSpec:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise QconvError(
            f"unsupported architecture {model_type!r}; the supported model types are "
            f"{', '.join(sorted(ARCHS))}") from None


def get_module(root, dotted: str):
    """``get_module(block, 'self_attn.q_proj')``: attribute walk that accepts list indices."""
    mod = root
    for part in dotted.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod
