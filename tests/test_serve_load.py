"""`qconv serve` under load and when clients misbehave: 32 concurrent streams, disconnects, a full queue."""
import gc
import http.client
import json
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

openai = pytest.importorskip("openai")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)


def wait_idle(url: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if (h["active"] == 0 and h["waiting"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.02)


def send(url: str, body: dict) -> http.client.HTTPConnection:
    """POST /v1/chat/completions; the response is not read yet."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def open_stream(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = send(url, body)
    return conn, conn.getresponse()


@pytest.fixture(scope="module")
def server(tiny_serve_ws, start_server):
    return start_server(tiny_serve_ws, max_queue=64)  # 8 slots: 24 of the 32 wait in the queue at first


@pytest.fixture(scope="module")
def model(server):
    with urllib.request.urlopen(server[0].url + "/v1/models") as r:
        return json.load(r)["data"][0]["id"]


def test_32_concurrent_streams_match_one_at_a_time(server, model):
    srv, scheduler = server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def ask(i: int) -> tuple[str, str]:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Story number {i}: " + "once upon a time " * (i % 7)}],
            temperature=0, max_tokens=16 + i % 9, stream=True)
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    ask(0)  # warm up, then the idle baseline
    gc.collect()
    idle_rss = rss_mib()
    alone = [ask(i) for i in range(32)]

    polls, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.perf_counter()
            h = health(srv.url)
            polls.append((time.perf_counter() - t0, h["active"], h["waiting"]))
            time.sleep(0.02)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, range(32)))
    finally:
        stop.set()
        poller.join()
    print(f"\nRSS idle {idle_rss:.0f} MiB, polls {len(polls)}, peak active {max(p[1] for p in polls)}, peak waiting {max(p[2] for p in polls)}, slowest health {max(p[0] for p in polls):.3f}s")
    assert together == alone                                        # same text, nothing lost
    assert all(finish in ("stop", "length") for _, finish in together)
    assert len(polls) >= 5 and max(p[0] for p in polls) < 2.0       # /health answered throughout
    assert max(p[1] for p in polls) > 1 and max(p[1] for p in polls) <= 8  # batched, within the slots
    assert max(p[2] for p in polls) > 0                             # some waited in the queue
    h = wait_idle(srv.url)
    assert h["active"] == 0 and h["waiting"] == 0                   # every slot free, the queue empty
    gc.collect()
    assert rss_mib() - idle_rss < 64, f"RSS grew from {idle_rss:.0f} to {rss_mib():.0f} MiB"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(server, model, stream):
    srv, scheduler = server
    before = scheduler.stats()
    conn = send(srv.url, {"model": model, "messages": [{"role": "user", "content": "Go on forever"}],
                          "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": stream})
    if stream:
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")  # it is running
    else:  # the answer comes whole at the end: wait until it runs
        deadline = time.monotonic() + 10
        while scheduler.stats().active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    conn.sock.close()  # the client vanishes mid-answer
    conn.close()
    h = wait_idle(srv.url, timeout=3.0)
    after = scheduler.stats()
    assert h["active"] == 0 and after.finished == before.finished + 1
    assert after.steps - before.steps < 900  # cut short, not run to max_tokens


def test_a_full_queue_answers_503_with_retry_after(tiny_serve_ws, start_server):
    srv, scheduler = start_server(tiny_serve_ws, max_batch_size=1, max_queue=0)
    with urllib.request.urlopen(srv.url + "/v1/models") as r:
        model = json.load(r)["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    conn, r = open_stream(srv.url, body)
    assert r.readline().startswith(b"data: ")  # holds the only slot
    conn2, r2 = open_stream(srv.url, {**body, "stream": False})
    err = json.loads(r2.read())
    assert r2.status == 503 and r2.getheader("Retry-After") == "1"
    assert err["error"]["type"] == "server_error" and err["error"]["code"] == "queue_full"
    conn2.close()
    conn.sock.close()
    conn.close()
    assert wait_idle(srv.url)["active"] == 0
    conn3, r3 = open_stream(srv.url, {**body, "stream": False, "max_tokens": 3})
    assert r3.status == 200 and json.loads(r3.read())["usage"]["completion_tokens"] == 3
    conn3.close()
