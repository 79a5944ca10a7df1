"""`qconv serve` through the official openai client, and bad requests (tiny random llama, CPU)."""
import http.client
import json
import threading
from urllib.parse import urlparse

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tiny_serve_ws, start_server):
    srv, scheduler = start_server(tiny_serve_ws, max_queue=64, api_key=KEY)
    return srv, scheduler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def post(url: str, path: str, body, key: str | None = KEY, raw: bool = False):
    """POST with the stdlib (no client-side validation) -> (status, headers, parsed JSON body)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, body if raw else json.dumps(body), headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), json.loads(data)


# ----------------------------------------------------------------------------------------------
# The openai client
# ----------------------------------------------------------------------------------------------
def test_chat_whole_and_streamed_agree(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20)
    text, choice = r.choices[0].message.content, r.choices[0]
    assert text and choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and chunks[-1].choices == []


def test_max_tokens_and_ignore_eos(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_completions_and_stop_strings(client, model):
    prompt = "The quick brown fox"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece from the middle of the greedy answer
    want = full[:full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "\x00"],
                                      stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == want and finish == "stop"
    ids = client.completions.create(model=model, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3


def test_seed_gives_the_same_sample(client, model):
    def ask(seed):
        return client.chat.completions.create(model=model, messages=QUESTION, temperature=1.0, top_p=0.95,
                                              seed=seed, max_tokens=16).choices[0].message.content
    first = ask(7)
    assert ask(7) == first and ask(8) != first


def test_two_conversations_at_once(client, model):
    def converse(topic: str) -> list[str]:
        messages, answers = [], []
        for turn in (f"Tell me about {topic}.", "And more?"):
            messages.append({"role": "user", "content": turn})
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=24, stream=True))
            messages.append({"role": "assistant", "content": text})
            answers.append(text)
        return answers

    alone = {t: converse(t) for t in ("cats", "the sea")}
    together: dict[str, list[str]] = {}
    threads = [threading.Thread(target=lambda t=t: together.__setitem__(t, converse(t))) for t in alone]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert together == alone


# ----------------------------------------------------------------------------------------------
# Bad requests: a 4xx with an OpenAI error body each, and the server goes on
# ----------------------------------------------------------------------------------------------
def check_error(status, body, want_status, param=None, code=None, type="invalid_request_error"):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"] == type
    assert body["error"]["param"] == param and (code is None or body["error"]["code"] == code), body


CHAT = "/v1/chat/completions"


def test_bad_requests(server, model, wait_for):
    url = server[0].url
    ok = {"model": model, "messages": QUESTION, "max_tokens": 4}
    status, _, body = post(url, CHAT, b'{"model": "x", "messages": [', raw=True)
    check_error(status, body, 400, code="invalid_json")
    check_error(*post(url, CHAT, [1, 2])[::2], 400)
    for field, value in [("max_tokens", "5"), ("temperature", "hot"), ("messages", "hello"), ("stream", "yes"),
                         ("stop", 5), ("seed", 1.5)]:
        check_error(*post(url, CHAT, {**ok, field: value})[::2], 400, param=field, code="invalid_type")
    check_error(*post(url, CHAT, {"model": model})[::2], 400, param="messages")
    check_error(*post(url, CHAT, {**ok, "messages": [{"role": "user", "content": 3}]})[::2], 400, param="messages")
    for bad in (0, -1):
        check_error(*post(url, CHAT, {**ok, "max_tokens": bad})[::2], 400, param="max_tokens", code="invalid_value")
        check_error(*post(url, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": bad})[::2], 400,
                    param="max_tokens")
    long = [{"role": "user", "content": "lorem ipsum " * 1000}]  # > 1024 tokens
    check_error(*post(url, CHAT, {**ok, "messages": long})[::2], 400, param="messages", code="context_length_exceeded")
    check_error(*post(url, "/v1/completions", {"model": model, "prompt": list(range(1, 1100))})[::2], 400,
                param="prompt", code="context_length_exceeded")
    check_error(*post(url, "/v1/completions", {"model": model, "prompt": [10**9]})[::2], 400, param="prompt")
    check_error(*post(url, CHAT, {**ok, "model": "gpt-4"})[::2], 404, param="model", code="model_not_found")
    check_error(*post(url, CHAT, ok, key="wrong")[::2], 401, code="invalid_api_key")
    check_error(*post(url, CHAT, ok, key=None)[::2], 401, code="invalid_api_key")
    # the server goes on
    status, _, body = post(url, CHAT, ok)
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    # the response can reach us a moment before the worker thread frees the slot
    assert wait_for(lambda: server[1].stats().active == 0), server[1].stats()


def test_health_and_models_need_no_key_and_a_key(server):
    import urllib.request

    with urllib.request.urlopen(server[0].url + "/health") as r:
        health = json.load(r)
    assert health["status"] == "ok" and health["slots"] == 8 and health["session_len"] == 1024
    cache = server[1].engine.cache  # bytes per token of the cache the server holds, params included
    assert health["kv_mode"] == "fp16" and health["kv_bytes_per_token"] == cache.nbytes() // (8 * 1024) > 0
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server[0].url + "/v1/models")
    assert e.value.code == 401 and json.load(e.value)["error"]["code"] == "invalid_api_key"
