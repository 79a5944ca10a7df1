"""Continuous batching without HTTP: the scheduler against the single-sequence engine; streamed text with stops."""
import threading

import pytest
import torch

from qconv.runtime.detokenize import TextStream
from qconv.runtime.engine import Engine
from qconv.runtime.generation import GenerationConfig
from qconv.runtime.kv_cache import KVCache
from qconv.runtime.serve.scheduler import QueueFull, Request, Scheduler


class CharTokenizer:
    """id i <-> chr(i): hand-checkable decoding."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def stream(text: str, stop=(), final=True) -> list[str]:
    ts = TextStream(CharTokenizer(), stop)
    pieces = [ts.push(ord(c)) for c in text]
    return pieces + ([ts.finish()] if final else [])


def test_stop_strings_by_hand():
    assert "".join(stream("hello world", stop=("wor",))) == "hello "
    # an "l" could start "low": each waits until the next character shows it does not
    assert stream("hellx", stop=("low",)) == ["h", "e", "", "l", "lx", ""]
    assert "".join(stream("abcabd", stop=("abd", "ca"))) == "ab"  # the earliest match wins
    assert "".join(stream("held back", stop=("kx",), final=True)) == "held back"
    assert "".join(stream("held bac", stop=("ck",), final=False)) == "held ba"  # "c" waits while running


def test_streamed_text_equals_decoding_at_once(smollm2_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    text = "Grüße aus Köln! 東京タワー 🚀🚀 naïve café — «quotes» and\nnew lines\tтабы"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rand = torch.randint(0, len(tok), (200,), generator=torch.Generator().manual_seed(0)).tolist()
    for seq in (ids, rand):
        ts = TextStream(tok)
        got = "".join(ts.push(t) for t in seq) + ts.finish()
        assert got == tok.decode(seq, skip_special_tokens=True)


@pytest.mark.parametrize("int8", [False, True])
def test_cache_rows_write_into_the_parent(int8):
    params = {0: (torch.full((2,), 0.05), torch.zeros(2), torch.full((2,), 0.05), torch.zeros(2))} if int8 else None
    cache = KVCache(1, 4, 2, 8, 4, torch.float32, torch.device("cpu"), params)
    view = cache.rows(1, 3)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)  # [B=2, H_kv, S=3, D]
    view.write(0, torch.tensor([[0, 1, 2], [4, 2, 3]]), k, v, None)  # row 2 of the parent at positions 4, 2, 3
    whole_k, whole_v = cache.read(0, 4, 8)
    assert torch.equal(whole_k[1:3], view.read(0, 2, 8)[0]) and torch.equal(whole_v[1:3], view.read(0, 2, 8)[1])
    assert not whole_k[[0, 3]].any() and not whole_k[1, :, 3:].any()  # nothing outside the view's writes
    tol = 0.03 if int8 else 0  # int8: within half a step of 0.05
    assert (whole_k[2, :, [4, 2, 3]] - k[1]).abs().max() <= tol and (whole_v[1, :, :3] - v[0]).abs().max() <= tol


@pytest.fixture(scope="module")
def engine(tiny_serve_ws):
    return Engine.from_workspace(tiny_serve_ws, device="cpu", batch_size=4)


def run_all(scheduler, requests) -> list[list]:
    events = [[] for _ in requests]
    done = threading.Semaphore(0)

    def sink(i):
        def emit(ev):
            events[i].append(ev)
            if ev.finish:
                done.release()
        return emit
    for i, r in enumerate(requests):
        scheduler.submit(r, sink(i))
    for _ in requests:
        assert done.acquire(timeout=60)
    return events


def test_batched_greedy_equals_the_engine_alone(engine):
    """12 prompts of different lengths through 4 slots (they join and leave between steps) give exactly the
    tokens of engine.generate run on each alone."""
    tok = engine.tokenizer
    prompts = [torch.randint(0, 49152, (5 + 7 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(12)]
    gens = [GenerationConfig(max_new_tokens=4 + 3 * (i % 5), temperature=0, stop_ids=()) for i in range(12)]
    want = []
    for p, g in zip(prompts, gens):
        engine.reset()
        want.append(tok.decode(list(engine.generate(p, g)), skip_special_tokens=True))
    scheduler = Scheduler(engine, max_batch=4, max_queue=16).start()
    try:
        events = run_all(scheduler, [Request(p, g) for p, g in zip(prompts, gens)])
        stats = scheduler.stats()
    finally:
        scheduler.stop()
    assert ["".join(e.text for e in evs) for evs in events] == want
    assert [evs[-1].completion_tokens for evs in events] == [g.max_new_tokens for g in gens]
    assert all(evs[-1].finish == "length" for evs in events)
    assert stats.active == stats.waiting == 0 and stats.finished == 12
    assert stats.steps < sum(g.max_new_tokens for g in gens)  # rows shared decode steps


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, stop_ids=())
    other = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=4, stop_ids=())
    prompt = list(range(100, 120))
    scheduler = Scheduler(engine, max_batch=4).start()
    try:
        alone = run_all(scheduler, [Request(prompt, gen)])[0]
        crowd = run_all(scheduler, [Request(prompt[:7], other), Request(prompt, gen), Request(prompt[3:], other)])
    finally:
        scheduler.stop()
    assert "".join(e.text for e in crowd[1]) == "".join(e.text for e in alone)


def test_full_queue_and_cancel(engine, wait_for):
    long = GenerationConfig(max_new_tokens=900, temperature=0, stop_ids=())
    scheduler = Scheduler(engine, max_batch=1, max_queue=1).start()
    try:
        got = []
        first = scheduler.submit(Request([5, 6, 7], long), got.append)
        assert wait_for(lambda: scheduler.stats().active == 1)
        second = scheduler.submit(Request([5, 6, 8], long), got.append)
        with pytest.raises(QueueFull):
            scheduler.submit(Request([5, 6, 9], long), got.append)
        scheduler.cancel(second)  # out of the queue at once
        assert scheduler.stats().waiting == 0
        scheduler.cancel(first)   # out of its slot before the next step
        assert wait_for(lambda: scheduler.stats().active == 0)
        s = scheduler.stats()
        assert s.finished == 2 and s.steps < 900 and not any(e.finish for e in got)
    finally:
        scheduler.stop()


def test_a_failing_step_fails_its_requests_not_the_scheduler(engine):
    scheduler = Scheduler(engine, max_batch=2).start()
    try:
        gen = GenerationConfig(max_new_tokens=3, temperature=0, stop_ids=())
        bad = run_all(scheduler, [Request([5, 10**9], gen)])[0]  # an id past the vocabulary: the forward raises
        assert bad[-1].finish == "error" and "IndexError" in bad[-1].error
        good = run_all(scheduler, [Request([5, 6], gen)])[0]
        assert good[-1].finish == "length" and good[-1].completion_tokens == 3
        assert scheduler.stats().active == 0
    finally:
        scheduler.stop()
