"""Decode steps as CUDA graphs: GpuTransformer.decode_step captured once per batch bucket (and once more for
steps whose rows hold at most opts.short_context keys, which skip the attention merge kernel; ``key``).

    graphs = DecodeGraphs(model, cache, opts)     # buffers for up to max(cache.batch, opts.pack_rows) rows
    logits = graphs.step_host([tok], [pos], [0])  # one step for cache row 0 -> [1, V] (a view, valid until next step)
    logits = graphs.prefill(prompts, starts, rows)  # short prompts as packed steps -> [n, V] last-token logits
    for toks in graphs.greedy_rows(toks, poss, n, rows):  # several rows at once: a list of tokens per step

A step of n rows replays the graph of the smallest bucket (1, 2, 4, 8, ... and the largest) holding n;
the bucket's other rows are padding (position -1: no cache write, attention over nothing). Inputs live
in one static int64 tensor ``idx`` [3, rows] = (token, position, cache row), so a step costs one
host-to-device copy and one graph launch. Only the CUDA runner (runtime/cuda/runner.py) holds the graphs; the model does not know it is captured.
Rows need not be distinct cache rows: a short prompt (up to opts.prefill_rows tokens) is prefilled as one step
whose rows are its tokens, all in one cache row at consecutive positions. Every row's K/V is written
before any row attends (decode_step's kernel order), and each row attends to positions <= its own, so the
step is causal prefill, replayed from a graph instead of ~15 launches per layer from Python.
Greedy decoding (``greedy_rows``) replays a graph of opts.burst steps that also takes each step's
argmax and writes it, with the position + 1, into ``idx``: the steps run back to back on the device. The
next burst is launched before the host reads the previous one's tokens, so the GPU never waits for the
host (the tokens of up to two bursts past a stop token are computed and thrown away).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .kernels.attention import num_splits, partials
from .kernels.attention_fused import counters
from .kernels.greedy import greedy_feed
from .kernels.greedy import scratch as greedy_scratch
from .kernels.w4_matmul import sum_buffers
from ..kv_cache import KVCache
from ..options import RuntimeOptions


@dataclass
class DecodeBuffers:
    """Static tensors of a decode step, sized for ``rows``; a bucket of b rows uses [:b]."""

    idx: torch.Tensor      # int64 [3, rows]: token, position (< 0: padding), cache row
    x: torch.Tensor        # fp32 [rows, hidden], the residual stream
    emb: torch.Tensor      # [rows, hidden] embedding rows
    qkv: torch.Tensor      # [rows, (Hq + 2 Hkv) * D]
    qkv_acc: torch.Tensor  # fp32 [rows, (Hq + 2 Hkv) * D], zero between uses (split-K qkv sums)
    attn: torch.Tensor     # [rows, Hq * D]
    ffn: torch.Tensor      # [rows, inter]: silu(gate) * up, written by the w13 GEMV's epilogue
    ffn_sums: tuple[torch.Tensor, torch.Tensor]  # w13 under split-K: fp32 sums [rows, 2 inter] (w2 takes their
    # SiLU-mul) and the tile counters of a SiLU-mul epilogue under split-K
    h: torch.Tensor        # [rows, hidden], the final norm's output
    logits: torch.Tensor   # [rows, vocab]
    next_tok: torch.Tensor  # int64 [rows]: greedy steps' argmax
    ring: torch.Tensor     # int64 [burst, rows]: the tokens of one greedy burst
    count: torch.Tensor    # int32 [rows, Hkv]: the fused attention kernel's split counters (zero between steps)
    greedy: tuple[torch.Tensor, ...]  # kernels/greedy.py's scratch: per-slice maxima, their indices, counters
    splits: dict[int, int] = field(default_factory=dict)                     # bucket -> attention splits
    parts: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # bucket -> attention partials

    @classmethod
    def allocate(cls, cfg, dtype: torch.dtype, device: torch.device, buckets: list[int], max_len: int,
                 burst: int, sms: int = 132, split_cap: int | None = None) -> DecodeBuffers:
        R, H, D = max(buckets), cfg.hidden_units, cfg.size_per_head
        bufs = cls(idx=torch.zeros(3, R, dtype=torch.int64, device=device),
                   x=torch.zeros(R, H, dtype=torch.float32, device=device),
                   emb=torch.zeros(R, H, dtype=dtype, device=device),
                   qkv=torch.zeros(R, (cfg.head_num + 2 * cfg.kv_head_num) * D, dtype=dtype, device=device),
                   qkv_acc=torch.zeros(R, (cfg.head_num + 2 * cfg.kv_head_num) * D, dtype=torch.float32,
                                       device=device),
                   attn=torch.zeros(R, cfg.head_num * D, dtype=dtype, device=device),
                   ffn=torch.zeros(R, cfg.inter_size, dtype=dtype, device=device),
                   ffn_sums=sum_buffers(R, 2 * cfg.inter_size, device),
                   h=torch.zeros(R, H, dtype=dtype, device=device),
                   logits=torch.zeros(R, cfg.vocab_size, dtype=dtype, device=device),
                   next_tok=torch.zeros(R, dtype=torch.int64, device=device),
                   ring=torch.zeros(burst, R, dtype=torch.int64, device=device),
                   count=counters(R, cfg.kv_head_num, device), greedy=greedy_scratch(R, device))
        for b in buckets:
            ns = num_splits(b, cfg.kv_head_num, max_len, sms=sms, cap=split_cap)
            bufs.splits[b] = ns
            bufs.parts[b] = partials(b, cfg.head_num, ns, D, device)
        return bufs


def default_buckets(rows: int) -> list[int]:
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


class DecodeGraphs:
    def __init__(self, model, cache: KVCache, opts: RuntimeOptions, buckets: list[int] | None = None):
        self.model, self.cache, self.opts = model, cache, opts
        self.use_graphs = opts.cuda_graphs
        self.rows = cache.batch
        self.prefill_rows, self.burst = opts.prefill_rows, opts.burst
        self.pack_rows = min(opts.pack_rows, max(self.prefill_rows, self.rows * self.prefill_rows))
        self.buckets = sorted(set(buckets or default_buckets(max(self.rows, self.pack_rows))))
        assert self.buckets[-1] >= self.rows, f"buckets {self.buckets} do not reach {self.rows} rows"
        dev = cache.k[0].device
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        self.bufs = DecodeBuffers.allocate(model.cfg, model.dtype, dev, self.buckets, cache.max_len, self.burst, sms,
                                           opts.attention_split_cap)
        self.host = torch.zeros(3, self.buckets[-1], dtype=torch.int64).pin_memory()
        self.host_np = self.host.numpy()  # written through numpy: no torch dispatch per step
        self._copied = torch.cuda.Event()
        self._copied.record()
        # keyed (bucket, short): short graphs serve steps whose rows hold at most opts.short_context keys (``key``)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph | None] = {}
        self.greedy_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph | None] = {}  # -> one greedy step
        self.burst_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph | None] = {}   # -> burst greedy steps
        self.ring_host = [torch.zeros(self.burst, self.buckets[-1], dtype=torch.int64).pin_memory() for _ in range(2)]
        self.ring_ready = [torch.cuda.Event() for _ in range(2)]
        self.pool = None

    def bucket(self, n: int) -> int:
        assert 1 <= n <= self.buckets[-1], f"{n} rows in a decode step; the buffers hold {self.buckets[-1]}"
        return next(b for b in self.buckets if b >= n)

    def key(self, n: int, keys: int, distinct: bool = False) -> tuple[int, bool]:
        """The graph key of a step of n rows whose longest row holds ``keys`` keys (its position + 1; of a burst's
        last step): (bucket, short). Short needs the fused attention's path: one row, or distinct rows."""
        b = self.bucket(n)
        return b, (b == 1 or distinct) and keys <= self.opts.short_context

    @torch.inference_mode()
    def capture(self, b: int, short: bool = False) -> None:
        """Compile (first launches) and capture the step for bucket b (short: for rows of at most
        opts.short_context keys). Every row is padding meanwhile, so neither the warm-up nor the capture touches
        the cache."""
        if not self.use_graphs:  # eager steps (for comparison and debugging): nothing to capture
            self.graphs[b, short] = None
            return
        self.graphs[b, short] = self._capture(
            lambda: self.model.decode_step(self.bufs, b, self.cache, self.opts, short=short), b)

    def _capture(self, fn, b: int, warmup: int = 2) -> torch.cuda.CUDAGraph:
        """fn() warmed up, then captured into the shared memory pool, with rows 0..b-1 as padding; idx is restored."""
        idx = self.bufs.idx[:, :b].clone()
        pad = torch.tensor([[0], [-1], [0]], device=idx.device)
        self.bufs.idx[:, :b] = pad
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
                self.bufs.idx[:, :b] = pad  # greedy steps move the position on
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.pool = graph.pool()
        self.bufs.idx[:, :b] = idx
        return graph

    def _replay(self, key: tuple[int, bool]) -> None:
        graph = self.graphs[key]
        if graph is None:
            self.model.decode_step(self.bufs, key[0], self.cache, self.opts, short=key[1])
        else:
            graph.replay()

    def _greedy_step(self, b: int, i: int | None = None, short: bool = False) -> None:
        """Rows 0..b-1: one decode step, each row's argmax (into ring[i] when given), and the next step's inputs
        in idx: token = argmax, position + 1 (padding rows stay padding)."""
        bufs = self.bufs
        # greedy_rows' rows are distinct
        self.model.decode_step(bufs, b, self.cache, self.opts, distinct=True, short=short)
        greedy_feed(bufs.logits[:b], bufs.idx, bufs.next_tok, None if i is None else bufs.ring[i], bufs.greedy)

    @torch.inference_mode()
    def _capture_greedy(self, b: int, short: bool = False) -> None:
        key = b, short
        if key not in self.graphs:
            self.capture(b, short)  # compiles the kernels; the greedy graphs share its memory pool
        if not self.use_graphs:
            self.greedy_graphs[key] = self.burst_graphs[key] = None
            return
        # its tokens are copied into the ring after each replay
        self.greedy_graphs[key] = self._capture(lambda: self._greedy_step(b, short=short), b)
        # no warm-up: its later steps would move off the padding position and write into the cache
        self.burst_graphs[key] = self._capture(lambda: [self._greedy_step(b, i, short) for i in range(self.burst)], b,
                                               warmup=0)

    def _launch_burst(self, key: tuple[int, bool], k: int, slot: int) -> None:
        """k greedy steps of graph key (bucket, short), their tokens copied into ring_host[slot] when done
        (ring_ready[slot])."""
        if key not in self.greedy_graphs:
            self._capture_greedy(*key)
        if k == self.burst and self.burst_graphs[key] is not None:
            self.burst_graphs[key].replay()
        else:
            for i in range(k):
                if self.greedy_graphs[key] is None:  # eager (use_graphs=False)
                    self._greedy_step(key[0], i, key[1])
                else:
                    self.greedy_graphs[key].replay()
                    self.bufs.ring[i, :key[0]].copy_(self.bufs.next_tok[:key[0]])
        self.ring_host[slot][:k].copy_(self.bufs.ring[:k], non_blocking=True)  # contiguous: stays asynchronous
        self.ring_ready[slot].record()

    @torch.inference_mode()
    def greedy_rows(self, tokens: list[int], positions: list[int], steps: int,
                    rows: list[int] | None = None) -> Iterator[list[int]]:
        """Greedy decoding of several sequences at once: row j feeds tokens[j] at positions[j] into cache row
        rows[j] (default j; the rows distinct), then each step's argmax, for ``steps`` steps -> each step's
        tokens (a list per step). The steps run in bursts of opts.burst on the device; the next burst is launched
        before the host reads the last one's tokens, so up to two bursts past the caller's last read are
        computed (and written into the cache) anyway."""
        n = len(tokens)
        if steps <= 0:
            return
        assert rows is None or len(set(rows)) == len(rows), f"greedy_rows needs distinct cache rows, got {rows}"
        self._upload(tokens, positions, rows)
        longest = max(positions) + 1  # keys of the longest row at the next step
        pending: deque[tuple[int, int]] = deque()  # (slot, steps) of launched bursts, oldest first
        left, launched = steps, 0
        while left or pending:
            if left and len(pending) < 2:  # keep one burst queued behind the one the host waits for
                k = min(self.burst, left)
                slot = launched % 2
                # a graph captured here (a first short or long burst) is queued behind the bursts in flight
                self._launch_burst(self.key(n, longest + k - 1, distinct=True), k, slot)
                pending.append((slot, k))
                left, launched, longest = left - k, launched + 1, longest + k
                if len(pending) < 2 and left:
                    continue
            slot, k = pending.popleft()
            self.ring_ready[slot].synchronize()
            yield from self.ring_host[slot][:k, :n].tolist()

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step_host(self, tokens: list[int], positions: list[int], rows: list[int] | None = None) -> torch.Tensor:
        """One decode step from host lists: token of each row, its position, its cache row (default
        0..n-1) -> logits [n, V], a view of the static buffer, valid until the next step."""
        n = len(tokens)
        key = self.key(n, max(positions) + 1)
        if key not in self.graphs:
            self.capture(*key)
        self._upload(tokens, positions, rows)
        self._replay(key)
        return self.bufs.logits[:n]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], starts: list[int], rows: list[int]) -> torch.Tensor:
        """Feed prompts[j] into cache row rows[j] from position starts[j], packed into decode steps of up to
        pack_rows rows (a prompt may span steps: its earlier positions go first) -> each prompt's
        next-token logits after its last token, [n, V] float32."""
        flat = [(tok, starts[j] + i, rows[j], j if i == len(p) - 1 else -1)
                for j, p in enumerate(prompts) for i, tok in enumerate(p)]
        out = torch.empty(len(prompts), self.model.cfg.vocab_size, device=self.bufs.logits.device)
        step = min(self.pack_rows, self.buckets[-1])
        for c in range(0, len(flat), step):
            part = flat[c:c + step]
            logits = self.step_host([f[0] for f in part], [f[1] for f in part], [f[2] for f in part])
            lasts = [(k, f[3]) for k, f in enumerate(part) if f[3] >= 0]
            if lasts:
                out[[j for _, j in lasts]] = logits[[k for k, _ in lasts]].float()
        return out

    def _upload(self, tokens: list[int], positions: list[int], rows: list[int] | None = None) -> None:
        """idx <- (token, position, cache row) of rows 0..n-1, the others padding; one host-to-device copy."""
        n = len(tokens)
        self._copied.synchronize()  # the previous step's copy has read the pinned buffer
        host = self.host_np
        host[0, n:], host[1, n:], host[2, n:] = 0, -1, 0  # padding rows
        host[0, :n], host[1, :n] = tokens, positions
        host[2, :n] = rows if rows is not None else range(n)
        self.bufs.idx.copy_(self.host, non_blocking=True)  # whole buffers: contiguous on both sides
        self._copied.record()
