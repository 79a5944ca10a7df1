"""How the runtime runs a workspace: one typed object, given at construction and never patched at run time.

    opts = RuntimeOptions(device="cuda", head="int8", attention="one")
    engine = Engine.from_workspace(ws, opts)

Torch-free at import, so the CLI reads its defaults from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import QconvError

HEADS = ("auto", "fp", "int8", "int4")
ATTENTION = ("one", "two", "three")


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "auto"            # auto | float16 | bfloat16 | float32 (loader.runtime_dtype says what auto is)
    head: str = "auto"             # the output projection: as stored (fp), or quantized at load (int8, int4)
    verify: bool = True            # check the files against manifest.json
    batch_size: int = 1            # KV-cache rows (sequences held at once)
    # -- the CUDA path -------------------------------------------------------------------------------------
    gpu_path: bool | None = None   # None: on CUDA with triton; True elsewhere only under TRITON_INTERPRET=1 (tests)
    cuda_graphs: bool = True       # decode steps replay captured graphs (False: eager kernels, for debugging)
    pdl: bool = True               # programmatic dependent launch where the GPU has it (sm_90+)
    # One-row steps: rotary + cache write + attention splits in one kernel, the splits merged by a second kernel
    # ("two") or by the last split to finish inside the first ("one"); "three": rope, splits and merge as three
    # kernels, the several-row path.
    attention: str = "two"
    attention_block_n: int = 64    # keys per tile of the fused attention kernel
    attention_warps: int = 8
    attention_wide: bool = True    # one row past 4096 tokens reads each split's 128 keys as one tile
    attention_split_cap: int = 64  # at most this many key splits per (row, kv head)
    # A w13 that splits K adds its slices into fp32 sums and w2 applies the SiLU-mul as it loads them (True), or
    # the last slice of each tile applies it (a fence, a counter and the sums read back).
    silu_in_w2: bool = True
    # Steps whose rows hold at most this many keys merge the attention splits in the attention kernel: no merge
    # kernel. 0: never.
    short_context: int = 64
    burst: int = 8                 # greedy steps per graph launch
    prefill_rows: int = 64         # prompts up to this many tokens are prefilled as one decode step (rows = tokens)
    pack_rows: int = 256           # several short prompts are packed into steps of up to this many rows

    def __post_init__(self):
        if self.head not in HEADS:
            raise QconvError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.attention not in ATTENTION:
            raise QconvError(f"attention {self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.batch_size < 1:
            raise QconvError(f"batch size must be at least 1, got {self.batch_size}")
        for name in ("burst", "prefill_rows", "pack_rows", "attention_block_n", "attention_warps",
                     "attention_split_cap"):
            if getattr(self, name) < 1:
                raise QconvError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.short_context < 0:
            raise QconvError(f"short_context must be >= 0, got {self.short_context}")

    def replace(self, **changes) -> RuntimeOptions:
        return dataclasses.replace(self, **changes)

    @property
    def attention_kw(self) -> dict:
        """The fused attention kernel's tile options."""
        return {"block_n": self.attention_block_n, "num_warps": self.attention_warps, "wide": self.attention_wide}
