"""The serving engine: one thread owns the model and decodes every running request in one batch (docs/serving.md).

Continuous batching over typed states: a request is prefilled on its own, in chunks, from the longest cached
prefix of its prompt; it joins the running batch (`LMState.extend_`), advances one token per iteration with
the others through one `model.step`, and leaves (`select_`) as soon as it finishes or is cancelled. The engine
owns the batch state alone, so all three update it in place, layer by layer: its memory is one batch state plus
one layer's worth, not two batch states. Nothing here looks at a layer's state type (docs/state.md), so pure
H3, hybrid, Transformer and S4D models serve alike.
"""

from __future__ import annotations

import ctypes
import logging
import operator
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..config import INT_MAX, check_numbers
from ..generation.sampling import check_sampling, sample_next
from ..models import H3LM
from ..models.lm import LMState
from .cache import StateCache

log = logging.getLogger(__name__)


def _glibc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op where the C library is not glibc (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # TypeError: Windows' CDLL takes no None
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


# A prefill frees hundreds of MB of activations around the few long-lived tensors it keeps (the cache's copy,
# the row's state). glibc keeps such freed holes resident, so with every new request the process grew by far
# more than the states it holds (hippos bench serve, 125M pure H3, 1 vs 32 clients: 18.8 MiB per extra client
# whose state is 4.5 MiB; 13.2 MiB with this trim). Handing the free pages back after each prefill keeps the
# resident memory at what is in use, for a few milliseconds per prompt (prefill time unchanged within noise).
# The running batch is updated in place, so decode steps do not fragment the heap again: see _decode.
release_free_memory = _glibc_trim()

FINISH_REASONS = ("stop", "length", "cancelled", "error")
RATE_WINDOW_S = 10.0  # tokens_per_second looks this far back


def _token_ids(values: Iterable, name: str) -> tuple[int, ...]:
    """values as a tuple of Python ints (lists, tensors and numpy ints accepted); bools and floats refused."""
    try:
        ids = tuple(values)
        if any(isinstance(v, bool) for v in ids):
            raise TypeError
        return tuple(operator.index(v) for v in ids)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integer token ids, got {values!r}") from None


@dataclass(frozen=True)
class CompletionRequest:
    """One request in tokens: the prompt, how many new tokens at most, and how to choose them."""

    prompt: tuple[int, ...]  # token ids, at least one
    max_tokens: int  # new tokens at most, >= 1
    temperature: float = 1.0  # 0 is greedy
    top_p: float | None = None  # nucleus sampling, in (0, 1]
    seed: int | None = None  # seeds this request's own generator: the same tokens whatever else runs
    stop_token_ids: frozenset[int] = frozenset()  # emitting one of these finishes the request ("stop")

    POSITIVE: ClassVar[tuple[str, ...]] = ("max_tokens",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _token_ids(self.prompt, "prompt"))
        object.__setattr__(self, "stop_token_ids", frozenset(_token_ids(self.stop_token_ids, "stop_token_ids")))
        if not self.prompt:
            raise ValueError("prompt must hold at least one token id (the first new token needs its logits)")
        check_numbers(self)
        check_sampling(self.temperature, None, self.top_p)
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= INT_MAX):
            raise ValueError(f"seed must be an integer in 0 .. {INT_MAX}, or None for a random one; got {seed!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {sorted(self.stop_token_ids)}")


@dataclass(frozen=True)
class TokenEvent:
    """What a request's callback receives, on the engine thread: a new token, or the end, or both."""

    token: int | None  # the new token id (None only on a finishing event without a token)
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error" at the end
    prompt_tokens: int  # len(prompt)
    cached_tokens: int  # prompt tokens whose state came from the state cache (not prefilled)
    error: str | None = None  # what went wrong, when finish_reason is "error"


class QueueFullError(RuntimeError):
    """submit() while max_queue requests are already waiting for a row (HTTP 429: retry later)."""


@dataclass
class EngineConfig:
    """How many requests run and wait, how prompts are prefilled, and how much the state cache may hold."""

    max_running: int = 16  # requests decoded together in one batch at most
    max_queue: int = 64  # requests waiting for a row at most; beyond that submit raises QueueFullError
    prefill_chunk: int = 512  # prompt tokens prefilled per engine iteration (running rows keep decoding)
    cache_bytes: int = 1 << 30  # state cache budget in bytes (0 disables the cache)

    POSITIVE: ClassVar[tuple[str, ...]] = ("max_running", "max_queue", "prefill_chunk")

    def __post_init__(self) -> None:
        check_numbers(self)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters."""

    queued: int  # requests waiting for a row
    running: int  # requests holding a row (being prefilled or decoded)
    prompt_tokens: int  # prompt tokens received
    prefilled_tokens: int  # prompt tokens run through the model (the rest came from the cache)
    generated_tokens: int  # new tokens emitted
    tokens_per_second: float  # new tokens per second over the last ~10 s
    cache_hits: int  # prompts that found a cached prefix
    cache_misses: int  # prompts that found none
    cache_entries: int  # states in the cache
    cache_bytes: int  # bytes the cache holds
    requests_finished: dict[str, int]  # by finish reason


class RequestHandle:
    """A submitted request: its id, and a way to cancel it."""

    def __init__(self, request_id: str, wake: Callable[[], None]):
        self.id = request_id
        self._wake = wake
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Finish the request at the engine's next iteration ("cancelled"); thread-safe, idempotent."""
        if not self._cancelled:
            self._cancelled = True
            self._wake()


@dataclass(eq=False)
class _Job:
    """One request on its way through the engine (touched by the engine thread only, once submitted)."""

    request: CompletionRequest
    handle: RequestHandle
    on_event: Callable[[TokenEvent], None]
    generator: torch.Generator | None  # None for greedy requests
    looked_up: bool = False  # the cache was asked for its prompt's prefix
    cached: int = 0  # prompt tokens served from the cache
    pos: int = 0  # prompt tokens covered by `state`
    state: LMState | None = None  # the prefill's state, until the request joins the batch
    logits: Tensor | None = None  # (1, padded vocab) after the last prompt token
    tokens: list[int] = field(default_factory=list)  # emitted so far
    failure: str | None = None  # why the request must end with "error" (its callback raised)
    done: bool = False  # the finishing event was sent

    def end_reason(self) -> str | None:
        """Why the request must leave before its next token, or None."""
        return "error" if self.failure else "cancelled" if self.handle.cancelled else None

    def finish_reason(self, token: int) -> str | None:
        """After `token` was emitted: "stop", "length" or None (keep going)."""
        if token in self.request.stop_token_ids:
            return "stop"
        return "length" if len(self.tokens) >= self.request.max_tokens else None


@dataclass
class _Counters:
    """The totals behind EngineStats (guarded by the engine's lock)."""

    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    running: int = 0
    finished: Counter = field(default_factory=Counter)
    recent: deque = field(default_factory=deque)  # [time, tokens] buckets of the last RATE_WINDOW_S

    def note_generated(self, now: float, n: int) -> None:
        """Count n new tokens at time `now` (buckets of 0.1 s keep the window short)."""
        self.generated_tokens += n
        if self.recent and now - self.recent[-1][0] < 0.1:
            self.recent[-1][1] += n
        else:
            self.recent.append([now, n])
        while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
            self.recent.popleft()

    def rate(self, now: float, since: float) -> float:
        """New tokens per second over the window (or since `since`, when the engine is younger than it)."""
        span = min(RATE_WINDOW_S, now - since)
        total = sum(n for t, n in self.recent if now - t <= RATE_WINDOW_S)
        return total / span if span > 0 else 0.0


class Engine:
    """Serves completion requests on one model: continuous batching, chunked prefill and a state cache."""

    def __init__(self, model: H3LM, config: EngineConfig | None = None) -> None:
        if not isinstance(model, H3LM):
            raise TypeError(f"Engine serves an H3LM, got {type(model).__name__}")
        self.model = model.eval()
        self.config = config if config is not None else EngineConfig()
        self.device = model.device
        self.cache = StateCache(self.config.cache_bytes) if self.config.cache_bytes else None
        self._cond = threading.Condition()  # guards the queue, _live, _closing and the counters
        self._queue: deque[_Job] = deque()
        self._live: dict[str, _Job] = {}  # every request not finished yet, by id
        self._closing = False
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self._counters = _Counters()
        self._admitting: list[_Job] = []  # holding a row, being prefilled (engine thread only)
        self._rows: list[_Job] = []  # the running batch, in the order of _state's rows (engine thread only)
        self._state: LMState | None = None

    # ---- the public, thread-safe side ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (a daemon), which owns the model from now on."""
        with self._cond:
            if self._thread is not None or self._closing:
                raise RuntimeError("start() runs once per engine, before stop(); create a new Engine to restart")
            self._launch()

    def _launch(self) -> None:
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="hippos-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more requests; finish the queued and running ones (drain) or cancel them; join the thread.

        With a timeout the thread may still be draining on return (call again with drain=False to cut it short).
        An engine never started runs its thread now to finish (or cancel) what was queued.
        """
        with self._cond:
            self._closing = True
            if not drain:
                for job in self._live.values():
                    job.handle.cancel()
            if self._thread is None and self._live:
                self._launch()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def submit(self, request: CompletionRequest, on_event: Callable[[TokenEvent], None]) -> RequestHandle:
        """Queue a request; on_event gets each token and, last, exactly one event with finish_reason set."""
        if not isinstance(request, CompletionRequest):
            raise TypeError(f"submit takes a CompletionRequest, got {type(request).__name__}")
        vocab = self.model.config.vocab_size
        if max(request.prompt) >= vocab:
            raise ValueError(f"prompt token ids must be below the vocabulary size {vocab}, got {max(request.prompt)}")
        handle = RequestHandle(uuid.uuid4().hex, self._wake)
        job = _Job(request, handle, on_event, self._generator(request))
        with self._cond:
            if self._closing:
                raise RuntimeError("the engine is stopped and takes no new requests")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are waiting already (max_queue); retry later")
            self._queue.append(job)
            self._live[handle.id] = job
            self._counters.prompt_tokens += len(request.prompt)
            self._cond.notify_all()
        return handle

    def _generator(self, request: CompletionRequest) -> torch.Generator | None:
        """The request's own random source: seeded when asked, else from the OS; None when greedy."""
        if request.temperature == 0:
            return None
        generator = torch.Generator(device=self.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        return generator

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> EngineStats:
        """A consistent snapshot of the counters."""
        cache = self.cache
        with self._cond:
            c, now = self._counters, time.monotonic()
            return EngineStats(
                queued=len(self._queue),
                running=c.running,
                prompt_tokens=c.prompt_tokens,
                prefilled_tokens=c.prefilled_tokens,
                generated_tokens=c.generated_tokens,
                tokens_per_second=c.rate(now, self._started_at),
                cache_hits=cache.hits if cache else 0,
                cache_misses=cache.misses if cache else 0,
                cache_entries=len(cache) if cache else 0,
                cache_bytes=cache.bytes if cache else 0,
                requests_finished={r: c.finished[r] for r in FINISH_REASONS},
            )

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._iteration()
                except Exception as err:  # a bug or a device failure: the requests in flight fail, serving goes on
                    log.exception("engine iteration failed")
                    failed = self._admitting + self._rows
                    self._admitting, self._rows, self._state = [], [], None
                    self._fail(failed, err)
                self._count_running()

    def _wait_for_work(self) -> bool:
        """Block until there is work (True) or the engine is closing with nothing left (False)."""
        with self._cond:
            while not (self._queue or self._admitting or self._rows or self._closing):
                self._cond.wait()
            return bool(self._queue or self._admitting or self._rows)

    def _count_running(self) -> None:
        with self._cond:
            self._counters.running = len(self._admitting) + len(self._rows)

    def _iteration(self) -> None:
        """Drop cancelled requests, admit and prefill up to prefill_chunk tokens, then one decode step."""
        self._drop_ended()
        with self._cond:
            while self._queue and len(self._rows) + len(self._admitting) < self.config.max_running:
                self._admitting.append(self._queue.popleft())
            self._counters.running = len(self._admitting) + len(self._rows)
        self._prefill()
        if self._rows:
            self._decode()

    def _drop_ended(self) -> None:
        """Finish the requests cancelled (or whose callback failed) wherever they are."""
        with self._cond:
            waiting = [job for job in self._queue if job.end_reason()]
            for job in waiting:
                self._queue.remove(job)
        # A cancel may land at any moment: read each job's reason once, so one list holds every ended job.
        prefilling = [(job, job.end_reason()) for job in self._admitting]
        self._admitting = [job for job, reason in prefilling if reason is None]
        for job in waiting:
            self._emit(job, None, job.end_reason())
        for job, reason in prefilling:
            if reason is not None:
                self._emit(job, None, reason)
        reasons = [job.end_reason() for job in self._rows]
        leaving = {i: (reason, None) for i, reason in enumerate(reasons) if reason is not None}
        if leaving:
            self._remove_rows(leaving)

    def _prefill(self) -> None:
        """Prefill admitted prompts, prefill_chunk tokens in all, first come first; full ones join the batch."""
        budget = self.config.prefill_chunk
        while budget > 0 and self._admitting:
            job = self._admitting[0]
            try:
                budget -= self._prefill_some(job, budget)
                if job.pos == len(job.request.prompt):
                    self._admitting.pop(0)
                    self._join(job)
            except Exception as err:  # this request's failure (a bad prompt for the model, memory): it alone fails
                log.exception("prefill failed for request %s", job.handle.id)
                self._admitting = [j for j in self._admitting if j is not job]
                self._fail([job], err)

    def _prefill_some(self, job: _Job, budget: int) -> int:
        """Run up to `budget` more prompt tokens of `job` after its state; returns how many ran."""
        prompt = job.request.prompt
        if not job.looked_up:
            job.looked_up = True
            # At least the last prompt token is always run: the first new token needs its logits.
            if self.cache is not None and len(prompt) > 1:
                job.cached, job.state = self.cache.lookup(prompt[:-1])
                job.pos = job.cached
        chunk = prompt[job.pos : job.pos + budget]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        hidden, job.state = self.model.hidden_states(ids, state=job.state, return_state=True)
        job.pos += len(chunk)
        if job.pos == len(prompt):  # the LM head at the last position only: (1, L, vocab) logits would be waste
            job.logits = self.model.lm_head(hidden[:, -1])
        with self._cond:
            self._counters.prefilled_tokens += len(chunk)
        return len(chunk)

    def _join(self, job: _Job) -> None:
        """A prefilled request: keep its prompt's state, join the batch (or finish), then emit its first token."""
        if self.cache is not None:
            self.cache.insert(job.request.prompt, job.state)
        token = self._pick(job.logits, [job]).tolist()[0]
        job.tokens.append(token)
        reason = job.finish_reason(token)
        if reason is None:  # rows at other positions join as they are: concat right-aligns attention rows
            if self._state is None:
                self._state = job.state
            else:  # layer by layer: never two copies of the whole batch (the engine owns its state alone)
                self._state.extend_(job.state)
            self._rows.append(job)
        job.state, job.logits = None, None
        release_free_memory()  # before the first token goes out: a client that sees it sees the memory settled
        self._emit(job, token, reason)

    def _decode(self) -> None:
        """One model.step for every running row; emit each row's token; rows that finished leave."""
        last = torch.tensor([job.tokens[-1] for job in self._rows], dtype=torch.long, device=self.device)
        try:
            logits, _ = self.model.step(last, self._state, in_place=True)  # one layer's old and new at a time
            picks = self._pick(logits, self._rows).tolist()  # one host sync for the whole batch
        except Exception as err:  # the batch's step failed: every running request fails, the engine goes on
            log.exception("decode step failed")
            failed, self._rows, self._state = self._rows, [], None
            self._fail(failed, err)
            return
        ending = {}
        for i, (job, token) in enumerate(zip(self._rows, picks, strict=True)):
            job.tokens.append(token)
            reason = job.finish_reason(token)
            if reason is None:
                self._emit(job, token)
            else:
                ending[i] = (reason, token)
        if ending:
            self._remove_rows(ending)

    def _pick(self, logits: Tensor, jobs: list[_Job]) -> Tensor:
        """Each row's next token, (B,), from logits (B, padded vocab): greedy rows together, sampled rows each
        with their own generator, so that a row's tokens do not depend on the other rows."""
        vocab = self.model.config.vocab_size
        greedy = [i for i, job in enumerate(jobs) if job.request.temperature == 0]
        if len(greedy) == len(jobs):
            return sample_next(logits, vocab, temperature=0)
        picks = torch.empty(len(jobs), dtype=torch.long, device=logits.device)
        if greedy:
            rows = torch.tensor(greedy, dtype=torch.long, device=logits.device)
            picks[rows] = sample_next(logits[rows], vocab, temperature=0)
        for i, job in enumerate(jobs):
            r = job.request
            if r.temperature != 0:
                picks[i] = sample_next(logits[i : i + 1], vocab, r.temperature, None, r.top_p, job.generator)[0]
        return picks

    def _remove_rows(self, ending: dict[int, tuple[str, int | None]]) -> None:
        """Take these rows out of the batch (index -> (finish reason, last token or None)) and finish them.

        Each one's state covers its prompt and all its tokens but the last (not fed yet): that is kept in the
        cache under those tokens, before the finishing event, so a follow-up finds it.
        """
        rows = self._rows
        if self.cache is not None:
            for i in ending:
                key = rows[i].request.prompt + tuple(rows[i].tokens[:-1])
                if len(rows[i].tokens) > 1 and key not in self.cache:
                    self.cache.insert(key, self._state.select([i]))
        keep = [i for i in range(len(rows)) if i not in ending]
        self._rows = [rows[i] for i in keep]
        if keep:
            self._state.select_(keep)
        else:
            self._state = None
        for i, (reason, token) in ending.items():
            self._emit(rows[i], token, reason)

    def _fail(self, jobs: list[_Job], err: Exception) -> None:
        """Finish these requests with "error" (those already finished are skipped)."""
        for job in jobs:
            self._emit(job, None, "error", f"{type(err).__name__}: {err}")

    def _emit(self, job: _Job, token: int | None, reason: str | None = None, error: str | None = None) -> None:
        """Hand the request's callback one event; a callback that raises fails its request, never the engine."""
        if job.done or (job.failure and reason is None):  # a callback that raised hears only the end
            return
        job.done = reason is not None
        error = error or (job.failure if reason == "error" else None)
        with self._cond:
            if token is not None:
                self._counters.note_generated(time.monotonic(), 1)
            if reason is not None:  # the job has left the engine's lists by now
                self._counters.finished[reason] += 1
                self._counters.running = len(self._admitting) + len(self._rows)
                self._live.pop(job.handle.id, None)
        try:
            job.on_event(TokenEvent(token, reason, len(job.request.prompt), job.cached, error))
        except Exception as err:
            log.warning("the event callback of request %s raised", job.handle.id, exc_info=True)
            if reason is None:
                job.failure = f"the event callback raised {type(err).__name__}: {err}"
