"""The OpenAI-compatible wire format: the completion request, response and stream bodies, and error bodies.

Requests are checked strictly (docs/serving.md, "The HTTP server"): unknown fields, values of the wrong JSON
type and values out of range are refused with HTTP 400 and an OpenAI-style error body naming the field, so a
client's typo never silently changes what it gets. Responses follow OpenAI's legacy completions format.
This module needs pydantic (a dependency of the `serve` extra) and nothing from the engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # as OpenAI: at most four stop sequences
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions

# Fields of OpenAI's request that this server parses but supports only at their neutral value.
UNSUPPORTED = {
    "echo": (False,),
    "logprobs": (None,),
    "best_of": (None, 1),
    "suffix": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}


class APIError(Exception):
    """An error the server answers with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI's clients read the message and code from."""
        return error_body(self.message, self.param, self.code, self.kind)


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:  # fmt: skip
    """{"error": {...}} as OpenAI writes it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """`stream_options`: include_usage adds a last chunk with the usage (and empty choices)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionBody(BaseModel):
    """The body of POST /v1/completions (OpenAI's legacy completions), strictly typed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[int]
    max_tokens: int | None = Field(default=None, ge=1)  # None: DEFAULT_MAX_TOKENS; the server caps it
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: 1; 0 is greedy
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None  # an end-user id for the caller's own logs; not used
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        """The stop sequences as a tuple (a single string is one)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def parse_completion(raw: bytes) -> CompletionBody:
    """The request body checked: an APIError(400) names the first problem (malformed JSON, a field, a value)."""
    try:
        body = CompletionBody.model_validate_json(raw)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None
    _check_semantics(body)
    return body


def _check_semantics(body: CompletionBody) -> None:
    """The rules pydantic's types do not say: one prompt, stop strings, n, unsupported options."""
    if isinstance(body.prompt, str) and not body.prompt or body.prompt == []:
        raise APIError(400, "prompt is empty: give at least one character or one token id", "prompt")
    stops = body.stop_strings()
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {list(stops)!r}", "stop")
    if body.n != 1:
        raise APIError(400, f"n: this server returns one completion per request (n = 1), got {body.n}", "n")
    for name, neutral in UNSUPPORTED.items():
        if getattr(body, name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server; leave it out", name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options applies only when stream is true", "stream_options")


def validation_error(errors: list[dict]) -> APIError:
    """The first of pydantic's (or FastAPI's) errors as one 400 APIError: malformed JSON, an unknown field, a
    missing one, a value of the wrong type or out of range."""
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param, kind = (".".join(loc) or None), first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({first.get('msg', '')}); send one JSON object")
    if kind == "extra_forbidden":
        known = ", ".join(StreamOptions.model_fields if len(loc) > 1 else CompletionBody.model_fields)
        return APIError(400, f"unknown field {param!r}; this server takes: {known}", param)
    if kind == "missing":
        return APIError(400, f"{param} is required", param)
    if loc[:1] == ["prompt"]:
        return APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    if not loc and kind in ("model_type", "dict_type"):
        return APIError(400, "the body must be a JSON object")
    got = first.get("input")
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')} (got {got!r})", param)


def new_id() -> str:
    """A completion id in OpenAI's form."""
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """The `usage` object, with prompt_tokens_details.cached_tokens as OpenAI reports it."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion(cid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    """A whole (non-streamed) completion response."""
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}  # fmt: skip


def chunk(cid: str, model: str, text: str | None, finish_reason: str | None = None,
          use: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """One streamed chunk: a text delta, the finish reason, or (text None) the usage with empty choices."""
    choices = [] if text is None else [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def models_list(name: str, created: int) -> dict:
    """GET /v1/models: the one model this server serves."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "hippos"}]}


class CompletionText:
    """A request's generated tokens as text deltas: decoded incrementally, and cut before the first stop string.

    Decoding a window of recent tokens (not each token alone, not the whole text each time) keeps multi-byte
    characters whole at O(1) cost per token: a window whose text ends in U+FFFD (a character still missing
    bytes) is held back until the rest arrives. Text that could be the start of a stop string is held back
    too, so a client never receives any part of a stop string (docs/serving.md, "The HTTP server").
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), skip_ids: frozenset[int] = frozenset()):
        self.tokenizer, self.stops, self.skip_ids = tokenizer, stops, skip_ids
        self.ids: list[int] = []
        self.start = self.read = 0  # the decode window: ids[start:read] is already text, ids[read:] is new
        self.text = ""  # all text decoded so far (cut at the stop string once one is seen)
        self.sent = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found: the completion is over

    def push(self, token: int) -> str:
        """Take one generated token; return the text now safe to send ("" while held back)."""
        if self.stopped or token in self.skip_ids:
            return ""
        self.ids.append(token)
        self.text += self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: the text still held back (a partial character as U+FFFD, a partial stop string)."""
        if self.stopped:
            return ""
        self.text += self._decode(final=True)
        return self._release(final=True)

    def _decode(self, final: bool) -> str:
        """The new text of the window; "" while its last character is incomplete (unless final)."""
        done = self.tokenizer.decode(self.ids[self.start : self.read])
        full = self.tokenizer.decode(self.ids[self.start :])
        if not final and (full.endswith("\ufffd") or len(full) <= len(done)):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return full[len(done) :]

    def _release(self, final: bool) -> str:
        """Hand out text up to the first stop string, or up to what could still become one."""
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
            end = len(self.text)
        else:
            end = len(self.text) if final else len(self.text) - self._partial_stop()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def _partial_stop(self) -> int:
        """Length of the longest unsent tail of the text that a stop string starts with."""
        tail = self.text[self.sent :]
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(longest, len(tail)), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0
