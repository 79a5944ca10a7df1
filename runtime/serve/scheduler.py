"""Continuous batching: one worker thread runs the model for every request of a server.

    sched = Scheduler(engine, max_batch=8, max_queue=64).start()
    seq = sched.submit(Request(prompt_ids, GenerationConfig(...), stop=("\\n\\n",)), emit)  # emit(Event)
    sched.cancel(seq)     # from any thread: the client went away; its slot is free before the next step
    sched.stop()

Each running sequence owns one row (slot) of the engine's KV cache. Every turn of the loop:
[STEP 1] admit waiting requests into free slots (lowest first), [STEP 2] prefill them (batched per run
of adjacent slots), [STEP 3] one decode step over the rows that hold a sequence, each at its own position.
Both go through runtime/batch.py, the decode loop that Engine.generate and generate_batch use too. Sequences
join and leave between steps; a finished or cancelled one frees its slot at once. Requests beyond the free slots wait in a bounded queue; past it ``submit``
raises ``QueueFull``. Events (text pieces, the finish) go to each request's ``emit`` callback, called
from the worker thread: it must be quick and thread-safe (e.g. ``loop.call_soon_threadsafe``).
While a scheduler runs, its engine belongs to it (no ``engine.generate`` meanwhile).
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ... import QconvError
from ..detokenize import TextStream
from ..batch import Seq
from ..engine import Engine
from ..generation import GenerationConfig

log = logging.getLogger("qconv.serve")
FINISHES = ("stop", "length", "error")


class QueueFull(QconvError):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 503)."""


@dataclass(slots=True)
class Request:
    prompt: list[int]
    gen: GenerationConfig           # gen.stop_ids: None for the workspace's end_id, () to ignore EOS
    stop: tuple[str, ...] = ()      # stop strings: the text ends before the first match

    def __post_init__(self):
        if not self.prompt:
            raise QconvError("the prompt is empty")


@dataclass(slots=True, frozen=True)
class Event:
    text: str                       # new text, possibly ''
    completion_tokens: int          # answer tokens so far (a stop id is not counted)
    finish: str | None = None       # None while running, else one of FINISHES
    error: str | None = None        # with finish == "error"


@dataclass(slots=True, eq=False)
class Sequence:
    id: int
    request: Request
    emit: Callable[[Event], None]
    budget: int = 0                 # most answer tokens: min(max_new_tokens, session_len - prompt)
    slot: int | None = None
    state: Seq | None = None        # its tokens and position in its slot's cache row, once admitted
    cancelled: bool = False
    done: bool = False
    text: TextStream | None = None

    @property
    def new_tokens(self) -> int:
        return self.state.new_tokens if self.state is not None else 0


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    slots: int
    active: int
    waiting: int
    max_queue: int
    steps: int                      # decode steps run so far
    finished: int                   # sequences that ended (any reason, cancels included)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int | None = None, max_queue: int = 256,
                 max_prefill_tokens: int = 8192):
        max_batch = max_batch or engine.cache.batch
        if not 1 <= max_batch <= engine.cache.batch:
            raise QconvError(f"max batch {max_batch} is outside 1..{engine.cache.batch} (the engine's cache rows)")
        if max_queue < 0:
            raise QconvError(f"max queue must be >= 0, got {max_queue}")
        engine.reset()  # every cache row belongs to the scheduler now: forget generate()'s row-0 prefix
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.tokenizer_lock = threading.Lock()  # the worker decodes while request handlers encode
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._slots: list[Sequence | None] = [None] * max_batch
        self._ids = itertools.count()
        self._steps = self._finished = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="qconv-scheduler", daemon=True)

    # -- any thread ---------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Sequence:
        n, limit = len(request.prompt), self.engine.cfg.session_len
        if n >= limit:
            raise QconvError(f"the prompt has {n} tokens but session_len is {limit}")
        seq = Sequence(next(self._ids), request, emit, budget=min(request.gen.max_new_tokens, limit - n))
        with self._cond:
            if self._stopping:
                raise QconvError("the server is shutting down")
            free = self._slots.count(None)
            if len(self._waiting) >= self.max_queue + free:  # the worker admits up to `free` of them next turn
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self._waiting) - free} requests wait")
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop ``seq``: out of the queue now, out of its slot before the next step. No more events."""
        with self._cond:
            if seq.done or seq.cancelled:
                return
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.done = True
                self._finished += 1
            self._cond.notify_all()

    def stats(self) -> SchedulerStats:
        with self._cond:
            active = sum(s is not None for s in self._slots)
            return SchedulerStats(self.max_batch, active, len(self._waiting), self.max_queue, self._steps,
                                  self._finished)

    # -- worker thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._cond.wait()
                if self._stopping:
                    break
                self._drop_cancelled()
                admitted = self._admit()  # [STEP 1]
            try:
                self._prefill(admitted)   # [STEP 2]
                self._decode()            # [STEP 3]
            except Exception as e:  # a failed forward fails its requests, not the server
                log.exception("scheduler step failed")
                for seq in [s for s in self._slots if s is not None]:
                    self._end(seq, Event("", seq.new_tokens, "error", f"{type(e).__name__}: {e}"))
        with self._cond:
            left = list(self._waiting) + [s for s in self._slots if s is not None]
            self._waiting.clear()
        for seq in left:
            self._end(seq, Event("", seq.new_tokens, "error", "the server is shutting down"))
        self.engine.reset()  # the rows hold the server's sequences, not generate()'s

    def _drop_cancelled(self) -> None:
        for seq in self._slots:
            if seq is not None and seq.cancelled:
                self._free(seq)

    def _admit(self) -> list[Sequence]:
        admitted = []
        for slot, held in enumerate(self._slots):
            if held is not None:
                continue
            if not self._waiting:
                break
            seq = self._waiting.popleft()
            seq.slot, self._slots[slot] = slot, seq
            admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        end_id = self.engine.cfg.end_id
        for seq in seqs:
            gen = seq.request.gen
            seq.text = TextStream(self.engine.tokenizer, seq.request.stop)
            seq.state = Seq(seq.request.prompt, gen, seq.slot, seq.budget,
                            set(gen.stop_ids if gen.stop_ids is not None else end_id))
        if seqs:
            for seq, tok in zip(seqs, self.engine.batch(self.max_prefill_tokens).start([s.state for s in seqs])):
                self._accept(seq, tok)

    def _decode(self) -> None:
        live = [s for s in self._slots if s is not None]
        if not live:
            return
        toks = self.engine.batch(self.max_prefill_tokens).step([s.state for s in live])
        self._steps += 1
        for seq, tok in zip(live, toks):
            self._accept(seq, tok)

    def _accept(self, seq: Sequence, tok: int) -> None:
        finish = seq.state.accept(tok)
        with self.tokenizer_lock:
            if finish == "stop":
                piece = seq.text.finish()
            else:
                piece = seq.text.push(tok)
                if seq.text.stopped:
                    finish = "stop"
                elif finish == "length":
                    piece += seq.text.finish()
        if finish is not None:
            self._end(seq, Event(piece, seq.new_tokens, finish))
        elif piece:
            self._send(seq, Event(piece, seq.new_tokens))

    def _send(self, seq: Sequence, ev: Event) -> None:
        try:
            seq.emit(ev)
        except Exception:  # a broken sink (its event loop closed) means nobody listens: drop the sequence
            log.exception("request %d: its event sink failed; cancelling it", seq.id)
            seq.cancelled = True

    def _end(self, seq: Sequence, ev: Event) -> None:
        self._send(seq, ev)
        with self._cond:
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        """Called with the lock held."""
        if seq.slot is not None and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
        if not seq.done:
            seq.done = True
            self._finished += 1
