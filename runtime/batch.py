"""The one decode loop: sequences in rows of the KV cache, stepped together through the runner.

    batch = Batch(engine.runner, vocab_size, device)
    seqs = [Seq(prompt, gen, row=j, budget=64, stops={2}) for j, prompt in enumerate(prompts)]
    toks = batch.start(seqs)                  # prefill -> each sequence's first token
    finish = [s.accept(t) for s, t in zip(seqs, toks)]   # None while it runs, else "stop" | "length"
    toks = batch.step(live)                   # one decode step of the live sequences -> their next tokens
    for toks in batch.greedy(live, n): ...    # greedy sequences: the runner's device-side steps

``Engine.generate`` runs one sequence in row 0 (after the prefix the row already holds), ``generate_batch`` a
fixed set to the end, and the server's scheduler adds and drops sequences between steps: all three through this.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .generation import GenerationConfig
from .runner import Runner
from .sampling import sample


@dataclass(slots=True, eq=False)
class Seq:
    prompt: list[int]
    gen: GenerationConfig
    row: int                        # its cache row
    budget: int                     # most answer tokens
    stops: frozenset[int] | set[int]
    start: int = 0                  # prompt tokens the row already holds (their K/V are cached)
    pos: int = 0                    # cache position of `last`, the next token fed
    last: int = 0
    new_tokens: int = 0             # answer tokens so far (a stop id is not counted)
    finish: str | None = None       # None while it runs, else "stop" or "length"
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [1, V] bool, only with a repetition penalty

    @property
    def greedy(self) -> bool:
        return self.gen.temperature == 0 and self.gen.repetition_penalty == 1.0

    def accept(self, tok: int) -> str | None:
        """``tok``, the sequence's next token -> None while it runs on (tok is fed next), else its finish:
        "stop" (tok is a stop id, not counted) or "length" (tok was the last token of the budget)."""
        if tok in self.stops:
            self.finish = "stop"
            return self.finish
        self.new_tokens += 1
        if self.new_tokens >= self.budget:
            self.finish = "length"
            return self.finish
        self.last = tok
        if self.seen is not None:
            self.seen[0, tok] = True
        return None


class Batch:
    def __init__(self, runner: Runner, vocab_size: int, device: torch.device, max_prefill_tokens: int = 8192):
        self.runner, self.vocab_size, self.device = runner, vocab_size, device
        self.max_prefill_tokens = max_prefill_tokens

    def start(self, seqs: list[Seq]) -> list[int]:
        """Prefill each sequence's prompt past its ``start`` -> its first answer token (in the order given).
        Fresh sequences in adjacent rows share a forward while rows x longest prompt stays within
        max_prefill_tokens."""
        for s in seqs:
            if s.gen.seed is not None and not s.greedy:
                s.generator = torch.Generator(device=self.device).manual_seed(s.gen.seed)
            if s.gen.repetition_penalty != 1.0:
                s.seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
                s.seen[0, torch.tensor(s.prompt, device=self.device)] = True
            s.pos = len(s.prompt)
        first: dict[int, int] = {}
        for group in self._groups(seqs):
            logits = self.runner.prefill([s.prompt[s.start:] for s in group], [s.start for s in group],
                                         [s.row for s in group])  # [n, V]
            first.update(zip(map(id, group), self.pick(group, logits)))
        return [first[id(s)] for s in seqs]

    def _groups(self, seqs: list[Seq]) -> list[list[Seq]]:
        groups: list[list[Seq]] = []
        for s in sorted(seqs, key=lambda s: s.row):
            g = groups[-1] if groups else None
            if g and not s.start and not g[-1].start and g[-1].row + 1 == s.row and \
                    (len(g) + 1) * max(len(x.prompt) for x in (*g, s)) <= self.max_prefill_tokens:
                g.append(s)
            else:
                groups.append([s])
        return groups

    def step(self, seqs: list[Seq]) -> list[int]:
        """One decode step: each sequence's ``last`` enters its row at ``pos`` -> its next token."""
        logits = self.runner.decode([s.last for s in seqs], [s.pos for s in seqs], [s.row for s in seqs])
        for s in seqs:
            s.pos += 1
        return self.pick(seqs, logits)

    def greedy(self, seqs: list[Seq], steps: int) -> Iterator[list[int]]:
        """Up to ``steps`` steps of greedy sequences without a penalty, in the runner's greedy steps (bursts on
        the device on the GPU path) -> each step's tokens. The caller accepts them and stops reading when every
        sequence has finished; a finished one's row keeps being fed until then, past the caller's answer."""
        assert all(s.greedy for s in seqs), "Batch.greedy: only greedy sequences without a repetition penalty"
        for toks in self.runner.greedy([s.last for s in seqs], [s.pos for s in seqs], [s.row for s in seqs], steps):
            for s in seqs:
                s.pos += 1
            yield toks

    def pick(self, seqs: list[Seq], logits: torch.Tensor) -> list[int]:
        """logits [len(seqs), V] -> each sequence's next token by its own settings and generator."""
        argmax = logits.argmax(dim=-1).tolist()  # one sync for every greedy row
        unseen = None  # sample() reads a seen mask only with a repetition penalty
        out = []
        for i, s in enumerate(seqs):
            if s.greedy:
                out.append(argmax[i])
                continue
            if s.seen is None and unseen is None:
                unseen = torch.zeros_like(logits[:1], dtype=torch.bool)
            seen = s.seen if s.seen is not None else unseen
            out.append(int(sample(logits[i:i + 1], s.gen, seen, s.generator)[0]))
        return out
