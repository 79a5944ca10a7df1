"""The runtime's Python API: one loaded workspace plus its static KV cache.

    engine = Engine.from_workspace("./workspace", device="cpu")
    for piece in engine.chat([{"role": "user", "content": "Hi"}]):   # streamed text
        print(piece, end="", flush=True)
    engine.last_stats            # tokens, tok/s, KV-cache use of the last answer
    engine.generate(ids, gen)    # streamed token ids; engine.logits(ids) for evaluation

The cache keeps a batch dimension (``batch_size`` rows, each its own sequence) so a server can batch
later; ``generate`` and ``chat`` drive row 0 and reuse the longest prefix already in the cache.
On CUDA (runtime/cuda/model.py) every decode step replays a captured CUDA graph (runtime/cuda/graphs.py),
and so does the prefill of a prompt of up to PREFILL_ROWS new tokens (one step whose rows are its tokens);
greedy answers come from device-side bursts of steps; ``decode_batch`` runs one step for several rows at once.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import QconvError
from .detokenize import TextStream
from .cuda.model import GpuTransformer
from .kv_cache import KVCache
from .loader import LoadedWorkspace, load_workspace
from .generation import GenerationConfig
from .sampling import sample


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
    def __init__(self, ws: LoadedWorkspace, batch_size: int = 1):
        cfg = ws.cfg
        if not 1 <= batch_size <= cfg.max_batch_size:
            raise QconvError(f"batch size {batch_size} is outside 1..max_batch_size ({cfg.max_batch_size})")
        self.ws, self.cfg, self.model, self.tokenizer = ws, cfg, ws.model, ws.tokenizer
        self.device = ws.device
        store = 1 if cfg.quant_policy == 4 else torch.tensor([], dtype=ws.dtype).element_size()
        need = 2 * cfg.num_layer * batch_size * cfg.kv_head_num * cfg.session_len * cfg.size_per_head * store
        free = _free_memory(self.device)
        if need > cfg.cache_max_entry_count * free:
            raise QconvError(f"the KV cache for session_len {cfg.session_len} x batch {batch_size} needs "
                             f"{need / 2**30:.2f} GiB, more than cache_max_entry_count {cfg.cache_max_entry_count} "
                             f"of the {free / 2**30:.2f} GiB free; convert with a smaller --session-len")
        self.cache = KVCache(cfg.num_layer, batch_size, cfg.kv_head_num, cfg.session_len, cfg.size_per_head,
                             ws.dtype, self.device, ws.kv_qparams)
        self._cached: list[int] = []  # the tokens whose K/V cache row 0 holds, in order
        self.last_stats: GenerationStats | None = None
        self.decoder = None  # CUDA graphs of the decode step, on the GPU path
        if isinstance(self.model, GpuTransformer) and self.device.type == "cuda":
            from .cuda.graphs import DecodeGraphs

            self.decoder = DecodeGraphs(self.model, self.cache)
            self.model.decoder = self.decoder  # one-token forward calls on this cache replay the graphs

    @classmethod
    def from_workspace(cls, path, device: str = "auto", dtype: str = "auto", verify: bool = True,
                       batch_size: int = 1, head: str = "auto") -> Engine:
        """Load ``path`` (checking manifest.json unless ``verify=False``) and allocate the KV cache.
        ``head``: the output projection's format, see runtime/loader.load_workspace."""
        return cls(load_workspace(path, device, dtype, verify, head=head), batch_size)

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
        pos = torch.arange(S, device=self.device).expand(B, S)
        return self.model(ids.to(self.device), pos, self.cache).float()

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
        generator = None
        if gen.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(gen.seed)
        t0 = time.perf_counter()
        try:
            # [STEP 1]: prefill what the cache does not hold yet
            self._cached = self._cached[:reuse]
            logits = self._prefill(prompt[reuse:], reuse)
            self._cached = prompt
            penalize = gen.repetition_penalty != 1.0  # else `seen` is never read: no per-token update
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=self.device)
            if penalize:
                seen[0, torch.tensor(prompt, device=self.device)] = True
            # [STEP 2]: decode one token at a time (greedy on the GPU path: bursts of steps on the device)
            if self.decoder is not None and gen.temperature == 0 and not penalize:
                advance = self._burst_advance()
            else:
                def advance(tok: int, remaining: int) -> int:
                    if penalize:
                        seen[0, tok] = True
                    nxt = self._decode(tok, len(self._cached))
                    self._cached.append(tok)
                    return int(sample(nxt, gen, seen, generator)[0])
            tok = int(sample(logits, gen, seen, generator)[0])
            # the first token is on the host only now: on a GPU the prefill's kernels may still have been
            # running when its launches returned, and that time is the prefill's, not the decode's
            stats.prefill_s = time.perf_counter() - t0
            for step in range(budget):
                if tok in stops:
                    stats.finish = "stop"
                    return
                stats.new_tokens += 1
                yield tok
                if step + 1 == budget:
                    stats.finish = "length"
                    return
                tok = advance(tok, budget - step - 1)
        finally:
            if stats.prefill_s:  # else the prefill itself failed or was interrupted
                stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            stats.kv_used = len(self._cached)

    def _burst_advance(self):
        """advance(tok, remaining) -> the greedy token after tok, from the decoder's device-side bursts
        (DecodeGraphs.greedy_stream, started at the first call for all ``remaining`` steps): the same tokens as
        one step at a time."""
        stream = None

        def advance(tok: int, remaining: int) -> int:
            nonlocal stream
            if stream is None:
                stream = self.decoder.greedy_stream(tok, len(self._cached), remaining)
            self._cached.append(tok)
            return next(stream)
        return advance

    def _prefill(self, tokens: list[int], start: int, row: int = 0) -> torch.Tensor:
        """Feed ``tokens`` into cache row ``row`` from position ``start`` -> the last one's next-token logits
        [1, V] float32. On the GPU path a short prompt is one graph replay whose rows are its tokens
        (DecodeGraphs.prefill); otherwise the model's prefill on a one-row view of the cache."""
        S = len(tokens)
        if self.decoder is not None and S <= self.decoder.prefill_rows:
            return self.decoder.prefill([tokens], [start], [row])
        ids = torch.tensor(tokens, device=self.device)[None]  # [1, S]
        pos = torch.arange(start, start + S, device=self.device)[None]
        return self.model(ids, pos, self.cache.rows(row, row + 1), last_only=True)[:, -1].float()

    def _decode(self, tok: int, position: int) -> torch.Tensor:
        """Row 0's next-token logits [1, V] float32 after feeding ``tok`` at ``position``."""
        if self.decoder is not None:
            return self.decoder.step_host([tok], [position])  # compute dtype: sample() upcasts when it must
        pos = torch.tensor([[position]], device=self.device)
        return self.model(torch.tensor([[tok]], device=self.device), pos, self.cache, last_only=True)[:, -1].float()

    def generate_batch(self, prompts: list[list[int]], gen: GenerationConfig | None = None) -> list[list[int]]:
        """Answer several prompts at once, prompt j in cache row j: the answers' token ids (stop ids excluded),
        each cut at its first stop id or max_new_tokens. Greedy on the GPU path runs bursts of steps for all
        rows on the device (DecodeGraphs.greedy_rows); otherwise one decode_batch step at a time. The cache
        rows are left holding the prompts and answers (generate's reuse of row 0 starts afresh)."""
        gen = gen or GenerationConfig()
        n, limit = len(prompts), self.cfg.session_len
        if not 1 <= n <= self.cache.batch:
            raise QconvError(f"{n} prompts at once, but the engine holds {self.cache.batch} (--batch-size)")
        if min(map(len, prompts)) == 0:
            raise QconvError("a prompt is empty")
        budget = min(gen.max_new_tokens, limit - max(map(len, prompts)))
        if budget <= 0:
            raise QconvError(f"the longest prompt has {max(map(len, prompts))} tokens but session_len is {limit}; "
                             f"shorten it or convert with a larger --session-len")
        self._cached = []
        stops = set(gen.stop_ids if gen.stop_ids is not None else self.cfg.end_id)
        generator = torch.Generator(device=self.device).manual_seed(gen.seed) if gen.seed is not None else None
        seen = torch.zeros(n, self.cfg.vocab_size, dtype=torch.bool, device=self.device)  # repetition penalty
        for j, p in enumerate(prompts):
            seen[j, torch.tensor(p, device=self.device)] = True
        if self.decoder is not None and max(map(len, prompts)) <= self.decoder.prefill_rows:
            logits = self.decoder.prefill(prompts, [0] * n, list(range(n)))
        else:
            logits = torch.cat([self._prefill(p, 0, j) for j, p in enumerate(prompts)])
        toks = sample(logits, gen, seen, generator).tolist()
        answers: list[list[int]] = [[] for _ in range(n)]
        live = [True] * n

        def take(step: list[int]) -> bool:  # one step's tokens -> whether any row still runs
            for j, t in enumerate(step):
                if live[j]:
                    if t in stops or len(answers[j]) == budget:
                        live[j] = False
                    else:
                        answers[j].append(t)
            return any(live)
        if not take(toks) or budget == 1:
            return answers
        pos = [len(p) for p in prompts]
        if self.decoder is not None and gen.temperature == 0 and gen.repetition_penalty == 1.0:
            for step in self.decoder.greedy_rows(toks, pos, budget - 1):
                if not take(step):
                    break
            return answers
        for i in range(budget - 1):
            seen[torch.arange(n), torch.tensor(toks, device=self.device)] = True
            logits = self.decode_batch(toks, [q + i for q in pos])
            toks = sample(logits, gen, seen, generator).tolist()
            if not take(toks):
                break
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
        if self.decoder is not None:
            return self.decoder.step_host(tokens, positions, rows).float()
        if rows != list(range(n)):
            raise QconvError("without the GPU path, decode_batch takes rows 0..n-1 (pass rows=None)")
        ids = torch.tensor(tokens, device=self.device)[:, None]  # [n, 1]
        pos = torch.tensor(positions, device=self.device)[:, None]
        return self.model(ids, pos, self.cache, last_only=True)[:, -1].float()

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
    try:  # MemAvailable counts reclaimable page cache, unlike the free pages of sysconf
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse
