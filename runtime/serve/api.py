"""The FastAPI app of `qconv serve`: OpenAI-compatible endpoints over a running Scheduler, and the chat page.

    GET  /                     the chat page (runtime/serve/static/index.html)
    GET  /health               {"status": "ok", slots, active, waiting, ...}; no key needed
    GET  /v1/models            the one model, named as config.ini's model_name
    POST /v1/chat/completions  messages -> answer, whole or streamed (SSE chunks, then data: [DONE])
    POST /v1/completions       prompt (text or token ids) -> continuation, whole or streamed

The handlers run on the asyncio loop and never touch the model: they tokenize, ``submit`` to the
scheduler's worker thread and read its events from an asyncio.Queue fed with call_soon_threadsafe.
A client that goes away cancels its sequence (its KV-cache slot is free before the next step).
Every error is ``{"error": {"message", "type", "param", "code"}}``; a full queue is 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ... import QconvError
from .schema import (COMPLETIONS_MAX_TOKENS, ApiError, ChatRequest, CompletionRequest, Reply, error_body, parse,
                         usage)
from .scheduler import Event, QueueFull, Request as GenRequest, Scheduler, Sequence

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
RETRY_AFTER_S = 1


def create_app(scheduler: Scheduler, model_id: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="qconv", docs_url=None, redoc_url=None, openapi_url=None)
    engine = scheduler.engine
    page = PAGE.read_text()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):  # unknown route, wrong method
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", code=str(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided." if got else "No API key provided (Authorization: "
                           "Bearer KEY).", code="invalid_api_key")

    async def body_of(request: Request, kind):
        authorize(request)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        body = parse(kind, data)
        if body.model != model_id:
            raise ApiError(404, f"The model '{body.model}' does not exist; this server has '{model_id}'.",
                           param="model", code="model_not_found")
        return body

    def check_length(ids: list[int], param: str) -> None:
        limit = engine.cfg.session_len
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param, code="invalid_value")
        if len(ids) >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(ids)} tokens.", param=param, code="context_length_exceeded")

    # -- endpoints ----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        s = scheduler.stats()
        return {"status": "ok", "model": model_id, "slots": s.slots, "active": s.active, "waiting": s.waiting,
                "max_queue": s.max_queue, "steps": s.steps, "finished": s.finished,
                "session_len": engine.cfg.session_len, "kv_mode": engine.cfg.kv_mode,
                "kv_bytes_per_token": engine.kv_bytes_per_token}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "qconv",
                                            "max_model_len": engine.cfg.session_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request, ChatRequest)
        messages = [m.as_template() for m in body.messages]
        try:
            with scheduler.tokenizer_lock:
                ids = engine.render(messages)
        except QconvError as e:
            raise ApiError(400, str(e), param="messages", code="no_chat_template") from None
        check_length(ids, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.cfg.session_len
        return await answer(request, body, ids, max_tokens, Reply(chat=True, model=model_id))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request", param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            with scheduler.tokenizer_lock:
                ids = engine.tokenizer(prompt)["input_ids"]
        else:
            ids = prompt
            bad = [t for t in ids if not 0 <= t < engine.cfg.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside 0..{engine.cfg.vocab_size - 1}", param="prompt",
                               code="invalid_value")
        check_length(ids, "prompt")
        return await answer(request, body, ids, body.max_tokens or COMPLETIONS_MAX_TOKENS,
                            Reply(chat=False, model=model_id))

    # -- one request through the scheduler ----------------------------------------------------
    async def answer(request: Request, body, ids: list[int], max_tokens: int, reply: Reply):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        stops = body.stops()
        try:
            seq = scheduler.submit(GenRequest(ids, body.generation(max_tokens), stops),
                                   lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise ApiError(503, f"The server is busy ({e}); retry later.", type="server_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except QconvError as e:  # shutting down (prompt lengths were checked before)
            raise ApiError(503, str(e), type="server_error") from None
        if body.stream:
            return StreamingResponse(stream(seq, events, reply, len(ids), body.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, seq, events, reply, len(ids))

    async def whole(request: Request, seq: Sequence, events: asyncio.Queue, reply: Reply, n_prompt: int):
        pieces: list[str] = []
        loop_time = asyncio.get_running_loop().time
        last_check = loop_time()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    ev = None
                if loop_time() - last_check >= DISCONNECT_POLL_S:  # tokens may arrive faster than the timeout
                    last_check = loop_time()
                    if await request.is_disconnected():
                        return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
                if ev is None:
                    continue
                pieces.append(ev.text)
                if ev.finish == "error":
                    raise ApiError(500, f"generation failed: {ev.error}", type="server_error")
                if ev.finish is not None:
                    return reply.whole("".join(pieces), ev.finish, usage(n_prompt, ev.completion_tokens))
        finally:
            scheduler.cancel(seq)  # a no-op once it finished; frees the slot if the client went away

    async def stream(seq: Sequence, events: asyncio.Queue, reply: Reply, n_prompt: int, include_usage: bool):
        # Starlette cancels this generator when the client disconnects: `finally` frees the slot
        try:
            if reply.chat:
                yield sse(reply.chunk(None, role=True))
            while True:
                ev = await events.get()
                text = ev.text
                while ev.finish is None and not events.empty():  # under load: one chunk for what piled up
                    ev = events.get_nowait()
                    text += ev.text
                if ev.finish == "error":
                    yield sse(error_body(f"generation failed: {ev.error}", "server_error"))
                    break
                if text:
                    yield sse(reply.chunk(text))
                if ev.finish is not None:
                    yield sse(reply.chunk(None, finish=ev.finish))
                    if include_usage:
                        yield sse(reply.usage_chunk(usage(n_prompt, ev.completion_tokens)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel(seq)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
