"""Settings of one answer; torch-free so the CLI can take its defaults from here at import time."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import QconvError


@dataclass(slots=True)
class GenerationConfig:
    """Settings of one answer. The CLI takes its defaults from here (``GENERATION_DEFAULTS``)."""

    max_new_tokens: int = 512
    temperature: float = 0.7         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 0.9               # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None          # for sampling; None: fresh randomness
    stop_ids: tuple[int, ...] | None = None  # None: the workspace's end_id

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise QconvError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise QconvError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QconvError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QconvError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise QconvError(f"--repetition-penalty must be positive, got {self.repetition_penalty}")


GENERATION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
