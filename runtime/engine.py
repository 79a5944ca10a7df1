"""The runtime's Python API: one loaded workspace plus its static KV cache.

    engine = Engine.from_workspace("./workspace", device="cpu")
    for piece in engine.chat([{"role": "user", "content": "Hi"}]):   # streamed text
        print(piece, end="", flush=True)
    engine.last_stats            # tokens, tok/s, KV-cache use of the last answer
    engine.generate(ids, gen)    # streamed token ids; engine.logits(ids) for evaluation

The cache keeps a batch dimension (``batch_size`` rows, each its own sequence) so that a server can batch;
``generate`` and ``chat`` drive row 0 and reuse the longest prefix already in the cache. Every forward pass
goes through the runner (runtime/runner.py), the one seam to the CPU or CUDA backend: the engine never asks
which it holds.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import QconvError
from ..convert.memory import available_host_bytes
from .batch import Batch, Seq
from .detokenize import TextStream
from .generation import GenerationConfig
from ..convert.kv_mode import ONLINE_BITS, bytes_per_token
from .kv_cache import KVCache
from .loader import LoadedWorkspace, load_workspace, make_runner
from .options import RuntimeOptions


@dataclass(slots=True)
class GenerationStats:
    prompt_tokens: int
    reused_tokens: int          # prompt tokens whose K/V were already cached
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_used: int = 0            # tokens now held by the cache row
    kv_capacity: int = 0        # session_len
    finish: str = "interrupted"  # stop | length | interrupted

    @property
    def tok_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


class Engine:
    def __init__(self, ws: LoadedWorkspace, opts: RuntimeOptions = RuntimeOptions()):
        cfg, batch_size = ws.cfg, opts.batch_size
        if batch_size > cfg.max_batch_size:
            raise QconvError(f"batch size {batch_size} is outside 1..max_batch_size ({cfg.max_batch_size})")
        self.ws, self.cfg, self.model, self.tokenizer, self.opts = ws, cfg, ws.model, ws.tokenizer, opts
        self.device = ws.device
        self.kv_bytes_per_token = kv_bytes_per_token(cfg, ws.dtype)
        need = batch_size * cfg.session_len * self.kv_bytes_per_token
        free = _free_memory(self.device)
        if need > cfg.cache_max_entry_count * free:  # int4 admits about 4x the fp16 tokens, int8 2x
            fit = int(cfg.cache_max_entry_count * free // self.kv_bytes_per_token)  # tokens
            fewer = f"serve fewer sequences at once (--max-batch-size; batch x session_len <= {fit}), " \
                if batch_size > 1 else ""
            raise QconvError(f"the KV cache for batch {batch_size} x session_len {cfg.session_len} needs "
                             f"{need / 2**30:.2f} GiB, more than cache_max_entry_count {cfg.cache_max_entry_count} "
                             f"of the {free / 2**30:.2f} GiB free (room for {fit} tokens); {fewer}convert with a "
                             f"smaller --session-len, or raise cache_max_entry_count in {ws.path / 'config.ini'}")
        self.cache = KVCache(cfg.num_layer, batch_size, cfg.kv_head_num, cfg.session_len, cfg.size_per_head,
                             ws.dtype, self.device, ws.kv_qparams, ONLINE_BITS.get(cfg.kv_mode), **ws.kv_transform)
        self.runner = make_runner(self.model, self.cache, opts)
        self._cached: list[int] = []  # the tokens whose K/V cache row 0 holds, in order
        self.last_stats: GenerationStats | None = None

    @classmethod
    def from_workspace(cls, path, opts: RuntimeOptions | None = None, **options) -> Engine:
        """Load ``path`` (checking manifest.json unless ``verify=False``) and allocate the KV cache. ``opts``, or
        its fields as keywords (device, dtype, head, batch_size, ...): runtime/options.RuntimeOptions."""
        opts = opts.replace(**options) if opts is not None else RuntimeOptions(**options)
        return cls(load_workspace(path, opts), opts)

    def reconfigure(self, opts: RuntimeOptions) -> None:
        """A new runner with ``opts`` (the CUDA path's kernel and graph choices; the loaded weights, head and
        cache stay): how a benchmark compares settings on one engine."""
        self.runner.close()
        self.opts = opts
        self.runner = make_runner(self.model, self.cache, self.opts)
        self.reset()

    def close(self) -> None:
        """Free the runner's graphs and the KV cache; the engine is not usable afterwards."""
        self.runner.close()
        self.runner = self.cache = self.model = None
        self.ws.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset(self) -> None:
        """Forget the cached conversation (the next prompt is prefilled from scratch)."""
        self._cached = []

    # ------------------------------------------------------------------------------------------
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S], each row a fresh sequence from position 0 -> logits [B, S, V] float32."""
        B, S = ids.shape
        if S > self.cfg.session_len:
            raise QconvError(f"a window of {S} tokens is longer than the workspace's session_len "
                             f"{self.cfg.session_len}; use a shorter --seqlen or convert with a larger --session-len")
        if B > self.cache.batch:
            raise QconvError(f"{B} sequences at once, but the engine holds {self.cache.batch}")
        self._cached = []
        return self.runner.logits(ids)

    def generate(self, prompt_ids: list[int], gen: GenerationConfig | None = None) -> Iterator[int]:
        """Stream the answer's token ids (stop ids excluded) as they are produced.

        The prompt plus answer never exceed session_len: a prompt of session_len tokens or more is an
        error, and the answer is cut at session_len.
        """
        gen = gen or GenerationConfig()
        n, limit = len(prompt_ids), self.cfg.session_len
        if n == 0:
            raise QconvError("the prompt is empty")
        if n >= limit:
            raise QconvError(f"the prompt has {n} tokens but session_len is {limit}; shorten it or convert "
                             f"with a larger --session-len")
        reuse = 0
        for a, b in zip(self._cached, prompt_ids):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, n - 1)  # at least one token is fed to get the next logits
        stops = set(gen.stop_ids if gen.stop_ids is not None else self.cfg.end_id)
        return self._run(list(prompt_ids), reuse, gen, stops, min(gen.max_new_tokens, limit - n))

    def _run(self, prompt: list[int], reuse: int, gen: GenerationConfig, stops: set[int], budget: int):
        stats = self.last_stats = GenerationStats(len(prompt), reuse, kv_capacity=self.cfg.session_len)
        seq = Seq(prompt, gen, row=0, budget=budget, stops=stops, start=reuse)
        batch = self.batch()
        t0 = time.perf_counter()
        try:
            # [STEP 1]: prefill what the cache does not hold yet
            self._cached = self._cached[:reuse]
            tok = batch.start([seq])[0]
            self._cached = prompt
            # the first token is on the host only now: on a GPU the prefill's kernels may still have been
            # running when its launches returned, and that time is the prefill's, not the decode's
            stats.prefill_s = time.perf_counter() - t0
            # [STEP 2]: decode one token at a time (greedy: the runner's greedy steps, bursts on the GPU)
            steps = batch.greedy([seq], budget - 1) if seq.greedy else None
            while True:
                finish = seq.accept(tok)
                if finish != "stop":
                    stats.new_tokens += 1
                    yield tok
                if finish is not None:
                    stats.finish = finish
                    return
                tok = next(steps)[0] if steps is not None else batch.step([seq])[0]
                self._cached.append(seq.last)
        finally:
            if stats.prefill_s:  # else the prefill itself failed or was interrupted
                stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            stats.kv_used = len(self._cached)

    def batch(self, max_prefill_tokens: int = 8192) -> Batch:
        """The decode loop (runtime/batch.py) over this engine's runner and cache rows."""
        return Batch(self.runner, self.cfg.vocab_size, self.device, max_prefill_tokens)

    def generate_batch(self, prompts: list[list[int]], gen: GenerationConfig | None = None) -> list[list[int]]:
        """Answer several prompts at once, prompt j in cache row j: the answers' token ids (stop ids excluded),
        each cut at its first stop id or max_new_tokens. Greedy answers take the runner's greedy steps (bursts on
        the GPU), sampled ones one step at a time, each row with its own generator. The cache rows are left
        holding the prompts and answers (generate's reuse of row 0 starts afresh)."""
        gen = gen or GenerationConfig()
        n, limit = len(prompts), self.cfg.session_len
        if not 1 <= n <= self.cache.batch:
            raise QconvError(f"{n} prompts at once, but the engine holds {self.cache.batch} (--batch-size)")
        if min(map(len, prompts)) == 0:
            raise QconvError("a prompt is empty")
        # one budget for all: a greedy burst feeds every row until the last finishes, within session_len
        budget = min(gen.max_new_tokens, limit - max(map(len, prompts)))
        if budget <= 0:
            raise QconvError(f"the longest prompt has {max(map(len, prompts))} tokens but session_len is {limit}; "
                             f"shorten it or convert with a larger --session-len")
        self._cached = []
        stops = set(gen.stop_ids if gen.stop_ids is not None else self.cfg.end_id)
        seqs = [Seq(p, gen, row=j, budget=budget, stops=stops) for j, p in enumerate(prompts)]
        answers: list[list[int]] = [[] for _ in range(n)]
        batch = self.batch()

        def take(group: list[Seq], toks: list[int]) -> list[Seq]:  # -> the sequences still running
            for s, t in zip(group, toks):
                if s.finish is None and s.accept(t) != "stop":
                    answers[s.row].append(t)
            return [s for s in seqs if s.finish is None]
        live = take(seqs, batch.start(seqs))
        if live and all(s.greedy for s in live):
            group = live
            for toks in batch.greedy(group, budget - 1):
                if not take(group, toks):
                    break
            return answers
        while live:
            live = take(live, batch.step(live))
        return answers

    def decode_batch(self, tokens: list[int], positions: list[int], rows: list[int] | None = None) -> torch.Tensor:
        """One decode step for several sequences: tokens[i] enters cache row rows[i] (default i) at
        positions[i] -> next-token logits [n, V] float32. On CUDA one graph replay for all rows."""
        n = len(tokens)
        rows = list(range(n)) if rows is None else list(rows)
        if not (n == len(positions) == len(rows)) or n == 0:
            raise QconvError(f"decode_batch needs one position and row per token, got {n} tokens, "
                             f"{len(positions)} positions, {len(rows)} rows")
        if len(set(rows)) != n or min(rows) < 0 or max(rows) >= self.cache.batch:
            raise QconvError(f"rows {rows} must be distinct cache rows in 0..{self.cache.batch - 1}")
        if min(positions) < 0 or max(positions) >= self.cfg.session_len:
            raise QconvError(f"positions must lie in 0..{self.cfg.session_len - 1} (session_len)")
        if 0 in rows:
            self._cached = []  # row 0 no longer holds the conversation that generate() reuses
        return self.runner.decode(tokens, positions, rows).float()

    # ------------------------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> list[int]:
        """The chat template applied to ``messages`` (with the assistant prompt), as token ids."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise QconvError(f"the tokenizer in {self.ws.path / 'tokenizer'} has no chat template; "
                             f"use engine.generate with your own prompt")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of ``messages`` and how many messages were dropped: the oldest rounds go first (as
        Baichuan2's demo does) until the prompt fits max(session_len / 2, session_len - max_new_tokens); a
        leading system message is always kept."""
        limit = self.cfg.session_len
        budget = max(limit // 2, limit - max_new_tokens)
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        rest = messages[len(head):]
        starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
        for s in starts:  # oldest round first
            ids = self.render(head + rest[s:])
            if len(ids) <= budget:
                return ids, s
        if len(ids) < limit:  # the newest round alone: it fits, with less room for the answer
            return ids, starts[-1]
        raise QconvError(f"the prompt has {len(ids)} tokens but session_len is {limit}; shorten it or convert "
                         f"with a larger --session-len")

    def chat(self, messages: list[dict], gen: GenerationConfig | None = None, stream: bool = True):
        """Answer the conversation ``messages`` ([{"role", "content"}]): an iterator of text pieces as they
        are produced (``stream=True``) or the whole answer as one string."""
        gen = gen or GenerationConfig()
        ids = self.chat_prompt(messages, gen.max_new_tokens)[0]
        pieces = TextStream(self.tokenizer).feed_all(self.generate(ids, gen))
        return pieces if stream else "".join(pieces)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = available_host_bytes()  # MemAvailable counts reclaimable page cache, unlike sysconf's free pages
    if avail is not None:
        return avail
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """The KV cache's bytes per token of this workspace computing in ``dtype`` (per-token params included)."""
    return bytes_per_token(cfg.kv_mode, cfg.num_layer, cfg.kv_head_num, cfg.size_per_head,
                           torch.tensor([], dtype=dtype).element_size())
