"""The settings of `qconv awq`: bits, group size, symmetry, method and the search's knobs, checked on construction."""
from __future__ import annotations

from dataclasses import dataclass

from .. import QconvError
from .awq_search import QuantCfg


@dataclass(slots=True)
class AwqRequest:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    method: str = "awq"  # awq | rtn
    search_scale: bool = True
    clip: bool = True
    n_grid: int = 20
    # 4096 sampled tokens (AutoAWQ: 512): SmolLM2 w4 g64 wiki ppl 21.06 against 21.39 (bench/RESULTS.md)
    clip_samples: int = 4096

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QconvError(f"--w-bits must be 4 or 8, got {self.bits}")
        if self.bits == 8 and not self.sym:
            self.sym = True  # int8 weight-only is symmetric
        if self.group_size == 0 or self.group_size < -1:
            raise QconvError(f"--w-group-size must be positive (or -1 for per-channel int8), got {self.group_size}")
        if self.group_size == -1 and self.bits == 4:
            raise QconvError("--w-group-size -1 (per-channel) is only for --w-bits 8; 4-bit needs a group size")
        if self.method not in ("awq", "rtn"):
            raise QconvError(f"--method must be awq or rtn, got {self.method!r}")

    @property
    def q(self) -> QuantCfg:
        return QuantCfg(self.bits, self.group_size, self.sym)
