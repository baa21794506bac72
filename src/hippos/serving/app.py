"""The OpenAI-compatible HTTP app (FastAPI): POST /v1/completions, GET /v1/models, GET /health, GET /metrics.

The app never touches the model: it turns a request into token ids, hands them to the engine (whose one
thread owns the model) and turns the engine's events back into text, whole or as server-sent events. The
engine calls back on its own thread; `loop.call_soon_threadsafe` carries each event onto the event loop.
How requests are checked and bounded, and what each error looks like: docs/serving.md, "The HTTP server".
Only `hippos serve` imports this module (it needs the `serve` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .engine import CompletionRequest, QueueFullError, TokenEvent
from .metrics import Metrics
from .protocol import (
    DEFAULT_MAX_TOKENS,
    APIError,
    CompletionBody,
    CompletionText,
    chunk,
    completion,
    error_body,
    models_list,
    new_id,
    parse_completion,
    usage,
    validation_error,
)

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
RETRY_AFTER_S = 1  # the Retry-After of a 429: decode steps take milliseconds, so rows free up quickly
ROUTES = "POST /v1/completions, GET /v1/models, GET /health, GET /metrics"


def create_app(engine, tokenizer, model_name: str, config, vocab_size: int) -> FastAPI:
    """The app serving `engine` as `model_name`; config: a ServeConfig (api_key and the request limits).

    The app's lifespan starts the engine and, at shutdown, stops it after draining what is still running.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:  # uvicorn has waited for in-flight responses by now; draining is for anything left
            await asyncio.to_thread(engine.stop, True)

    app = FastAPI(title="hippos", summary=f"OpenAI-compatible completions from {model_name}", lifespan=lifespan)
    app.state.engine = engine
    metrics = Metrics(engine)
    served = _Served(engine, tokenizer, model_name, config, vocab_size)
    _add_routes(app, served, metrics)
    _add_error_handlers(app)
    app.add_middleware(_Guard, api_key=config.api_key, metrics=metrics)
    return app


def _add_routes(app: FastAPI, served: _Served, metrics: Metrics) -> None:
    """The four routes."""

    @app.get("/health")
    async def health() -> dict:
        """Whether the server is up (no key needed)."""
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        """The one model this server serves."""
        return models_list(served.name, served.created)

    @app.get("/metrics")
    async def scrape() -> Response:
        """Prometheus text: the engine's figures and the responses by status."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """A completion as OpenAI's legacy completions API gives it, whole or streamed."""
        return await served.complete(request)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style body; FastAPI's validation errors as 400 (not its default 422)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{err.detail}: {request.method} {request.url.path}; this server has {ROUTES}"
        return JSONResponse(error_body(message, code=str(err.status_code)), err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception) -> JSONResponse:
        message = f"internal error: {type(err).__name__}: {err}"
        return JSONResponse(error_body(message, kind="server_error"), 500)


class _Guard:
    """ASGI middleware: the API key on every route but /health (401 otherwise); responses counted by status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_response(message["status"])
            await send(message)

        problem = self._auth_problem(scope)
        if problem is None:
            return await self.app(scope, receive, counted)
        body = error_body(problem, code="invalid_api_key")
        await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted)

    def _auth_problem(self, scope) -> str | None:
        """Why the request may not pass (None: it may)."""
        if self.key is None or scope["path"] == "/health":
            return None
        given = dict(scope["headers"]).get(b"authorization")
        if given is None:
            return "missing API key: send the header 'Authorization: Bearer KEY' (the key given to hippos serve)"
        # compare_digest: the time taken does not tell an attacker how much of a guessed key was right
        return None if hmac.compare_digest(given, self.key) else "incorrect API key in the Authorization header"


class _Served:
    """The model as the routes see it: request checks, tokenization, and the engine."""

    def __init__(self, engine, tokenizer, name: str, config, vocab_size: int) -> None:
        self.engine, self.tokenizer, self.name, self.config, self.vocab_size = (
            engine, tokenizer, name, config, vocab_size)  # fmt: skip
        self.created = int(time.time())
        eos = getattr(tokenizer, "eos_token_id", None)
        # EOS ends a completion as OpenAI's models do: finish_reason "stop", and it is not printed
        self.stop_ids = frozenset() if eos is None else frozenset({eos})

    async def complete(self, request: Request) -> Response:
        """POST /v1/completions: check, tokenize, submit, then answer whole or as a stream of events."""
        body = parse_completion(await _read_body(request, self.config.max_body_bytes))
        self._check(body)
        prompt = await run_in_threadpool(self._prompt_ids, body.prompt)  # a long text takes a while to encode
        job = _Job(CompletionText(self.tokenizer, body.stop_strings(), self.stop_ids), len(prompt))
        job.submit(self.engine, self._engine_request(body, prompt))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies: pass events on at once
            events = self._events(job, request, include_usage)
            return _EventStream(job, events, media_type="text/event-stream", headers=headers)
        return await self._whole(job, request)

    def _check(self, body: CompletionBody) -> None:
        """The model name and the server's limit on max_tokens."""
        if body.model != self.name:
            message = f"The model '{body.model}' does not exist; this server serves '{self.name}' (GET /v1/models)"
            raise APIError(404, message, "model", "model_not_found")
        if body.max_tokens is not None and body.max_tokens > self.config.max_tokens:
            limit = self.config.max_tokens
            raise APIError(400, f"max_tokens {body.max_tokens} exceeds this server's limit of {limit}", "max_tokens")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt as token ids, within the vocabulary and the server's prompt limit."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", "prompt")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}", "prompt")
        if len(ids) > self.config.max_prompt_tokens:
            message = f"the prompt has {len(ids)} tokens; this server takes at most {self.config.max_prompt_tokens}"
            raise APIError(400, message, "prompt", "context_length_exceeded")
        return ids

    def _engine_request(self, body: CompletionBody, prompt: list[int]) -> CompletionRequest:
        """The engine's request for a checked body."""
        try:
            return CompletionRequest(
                prompt=tuple(prompt),
                max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop_token_ids=self.stop_ids,
            )
        except ValueError as err:
            raise APIError(400, str(err)) from None

    async def _whole(self, job: _Job, request: Request) -> Response:
        """A non-streamed answer: every delta joined (an empty reply if the client has gone)."""
        parts, finished = [], None
        async for delta, finish in job.deltas(request):
            parts.append(delta)
            finished = finish
        if finished is None:
            return Response(status_code=499)  # the client has gone: nobody reads this
        return JSONResponse(completion(job.id, self.name, "".join(parts), finished, job.usage()))

    async def _events(self, job: _Job, request: Request, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer: text deltas, the finish, the usage, then [DONE]."""
        try:
            async for delta, finish in job.deltas(request):
                if delta or finish:
                    yield _sse(chunk(job.id, self.name, delta, finish))
            if job.disconnected:
                return
            if include_usage:
                yield _sse(chunk(job.id, self.name, None, use=job.usage()))
        except APIError as err:  # the 200 header is out: the error goes as an event, as OpenAI sends it
            yield _sse(err.body())
        yield "data: [DONE]\n\n"


class _Job:
    """One request in flight: the engine's events brought onto the event loop and turned into text."""

    def __init__(self, text: CompletionText, prompt_tokens: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.id, self.text, self.handle = new_id(), text, None
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = prompt_tokens, 0, 0
        self.finished = self.disconnected = False  # finished: the engine said so; no need to cancel

    def on_event(self, event: TokenEvent) -> None:
        """The engine's callback (on the engine thread): hand the event to the event loop."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is gone, nobody waits for this
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def submit(self, engine, request: CompletionRequest) -> None:
        """Hand the request to the engine: 429 with Retry-After when its queue is full."""
        try:
            self.handle = engine.submit(request, self.on_event)
        except QueueFullError:
            message = "the server is at capacity (its queue of waiting requests is full); retry shortly"
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            raise APIError(429, message, code="queue_full", kind="rate_limit_error", headers=headers) from None
        except RuntimeError as err:  # the engine is stopping
            raise APIError(503, f"the server is not taking requests now ({err})", kind="server_error") from None

    def cancel(self) -> None:
        """Cancel the engine request unless the engine has finished it (idempotent)."""
        if not self.finished and self.handle is not None:
            self.handle.cancel()

    def usage(self) -> dict:
        """The usage object of this request so far."""
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    async def deltas(self, request: Request) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason or None) as engine events arrive; the engine request is cancelled if the client
        goes away, if a stop string ends the text, or if the caller stops listening for any other reason."""
        getter, checked = None, time.monotonic()
        try:
            while True:
                getter = getter or asyncio.ensure_future(self.queue.get())
                # waiting on the same getter again (not a new get() per timeout) never loses an event
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # also while tokens keep coming
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.disconnected = True
                        return
                if not done:
                    continue
                delta, finish = self._take_all(getter.result())
                getter = None
                yield delta, finish
                if finish:
                    return
        finally:
            if getter is not None:
                getter.cancel()
            self.cancel()

    def _take_all(self, event: TokenEvent) -> tuple[str, str | None]:
        """`event` and every event queued behind it, as one delta: when tokens come faster than the event loop
        wakes, one pass (and one streamed chunk) takes them all instead of one wake-up per token."""
        delta, finish = self._take(event)
        while finish is None and not self.queue.empty():
            more, finish = self._take(self.queue.get_nowait())
            delta += more
        return delta, finish

    def _take(self, event: TokenEvent) -> tuple[str, str | None]:
        """One engine event as (text delta, finish reason); an engine error or cancellation as an APIError."""
        self.cached_tokens = event.cached_tokens
        delta = ""
        if event.token is not None:
            self.completion_tokens += 1
            delta = self.text.push(event.token)
        if self.text.stopped:
            return delta, "stop"  # not finished for the engine: deltas() cancels the request
        reason = event.finish_reason
        self.finished = reason is not None
        if reason in ("stop", "length"):
            return delta + self.text.flush(), reason
        if reason == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down", kind="server_error")
        if reason is not None:
            raise APIError(500, f"generation failed: {event.error}", kind="server_error")
        return delta, None


class _EventStream(StreamingResponse):
    """A streamed answer that cancels its engine request however the response ends: also when sending fails
    before the event generator ever ran (a client gone at once), which no code inside the generator sees."""

    def __init__(self, job: _Job, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it is over `limit` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(size, limit)
        parts.append(part)
    return b"".join(parts)


def _too_large(size: int, limit: int) -> APIError:
    """413: the body is over the server's limit."""
    return APIError(413, f"the request body is {size}+ bytes; this server takes at most {limit}", code="too_large")


def _sse(body: dict) -> str:
    """One server-sent event carrying a JSON object (JSON escapes newlines, so it stays one data line)."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
