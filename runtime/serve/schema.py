"""The OpenAI wire format of `qconv serve`: request bodies (strict pydantic models), response objects, errors.

Strict models: a field of the wrong type (``"max_tokens": "5"``) is an error, never coerced. Unknown fields
are ignored, as clients send many. Extensions beyond OpenAI's fields use vLLM's names: ``top_k``,
``repetition_penalty`` and ``ignore_eos`` (generate until max_tokens, for benchmarks).
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..generation import GenerationConfig

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_fields(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the top-level field."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc)
    code = "invalid_type" if err["type"].endswith("_type") or err["type"] in ("missing", "literal_error") \
        else "invalid_value"
    return ApiError(400, f"{where}: {err['msg']}", param=loc[0] if loc else None, code=code)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template(self) -> dict:
        """{"role", "content"} with the text parts joined ("developer" is a system message to the template)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)   # OpenAI's default 1
    top_p: float | None = Field(None, gt=0, le=1)         # OpenAI's default 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)                          # one choice per request
    top_k: int = Field(0, ge=-1)                           # extension; 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0)           # extension; 1: off
    ignore_eos: bool = False                               # extension: do not stop at the end-of-text ids

    def generation(self, max_tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(self.top_k, 0), top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop_ids=() if self.ignore_eos else None)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop: a stop string is empty", param="stop", code="invalid_value")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]


def parse(model: type[_Sampling], data) -> _Sampling:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_fields(e) from None


# ---------------------------------------------------------------------------------------------
# Responses: a whole answer, or SSE chunks
# ---------------------------------------------------------------------------------------------
class Reply:
    """The response objects of one request: chat (``chat.completion[.chunk]``) or text (``text_completion``)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _obj(self, choices: list[dict], chunk: bool, usage: dict | None = None) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._obj([choice], chunk=False, usage=usage)

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._obj([choice], chunk=True)

    def usage_chunk(self, usage: dict) -> dict:
        return self._obj([], chunk=True, usage=usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
