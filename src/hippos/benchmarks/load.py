"""The load generator of `hippos bench serve`: concurrent streaming clients of a /v1/completions endpoint.

Each client sends its requests one after another with `stream: true` and notes the arrival time of every
server-sent event that carries text; the first arrival gives the time to first token (TTFT), the rest the
inter-token latencies (ITL). A round starts every client at once; its output tokens/s is every token that
arrived divided by the round's wall time, first send to last byte. Tokens are counted from the stream's
`usage` (completion_tokens) when the server reports it, else as the text events that arrived.

The server's memory is read from /proc/PID/status: its peak resident set (VmHWM, reset at the start of a
round through /proc/PID/clear_refs) and its resident set sampled while the round runs, of which the samples
taken while every client's request was decoding (`Round.decode_window`) give the decode-time memory. On
systems without /proc these read as None and the tables print "n/a". Our server's resident set also holds
its state cache (the prompt states it keeps for follow-ups, within its own budget): where asked, the round
also scrapes the server's /metrics for the cache's size, and the largest size inside the same window gives
the part of the decode-time memory that is the cache's. A server without that gauge (transformers serve)
simply gives no such samples.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

SAMPLE_S = 0.05  # how often the server's resident memory is sampled during a round
# How often the server's /metrics is scraped for its state cache's size during a round: the cache changes only
# when a request joins or finishes, so a coarse poll sees it, and a scrape costs the server little.
CACHE_SAMPLE_S = 0.5
# Our server's gauge of the bytes its state cache holds (docs/serving.md, "The HTTP server", Metrics).
CACHE_METRIC = "hippos_state_cache_bytes"


def http_module():
    """httpx's API: the httpx2 package (installed with huggingface_hub and openai) or httpx itself."""
    try:
        import httpx2 as http
    except ImportError:
        try:
            import httpx as http
        except ImportError:
            raise ImportError(
                "hippos bench serve needs an HTTP client: pip install 'hungry-hippos[hf]' (brings httpx2)"
            ) from None
    return http


@dataclass
class RequestResult:
    """One streamed request as its client saw it; times are time.perf_counter() seconds."""

    sent: float  # when the request was sent
    arrivals: list[float] = field(default_factory=list)  # when each text-carrying event arrived
    text: str = ""  # the completion's text, as streamed
    reported_tokens: int | None = None  # usage.completion_tokens, when the server sends usage
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    finish_reason: str | None = None
    error: str | None = None  # what went wrong (HTTP status, error event, broken stream)
    done: float = 0.0  # when the stream ended

    @property
    def tokens(self) -> int:
        """Tokens that arrived: the server's count when it reports one, else the text events."""
        return len(self.arrivals) if self.reported_tokens is None else self.reported_tokens

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first token (None if none came)."""
        return self.arrivals[0] - self.sent if self.arrivals else None

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive token events."""
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def _take_event(result: RequestResult, payload: str, now: float) -> bool:
    """Record one `data:` payload of the stream; True at the end of the stream."""
    if payload == "[DONE]":
        return True
    event = json.loads(payload)
    if "error" in event:
        error = event["error"]
        result.error = str(error.get("message", error) if isinstance(error, dict) else error)
        return True
    for choice in event.get("choices") or ():
        if choice.get("text"):
            result.arrivals.append(now)
            result.text += choice["text"]
        result.finish_reason = choice.get("finish_reason") or result.finish_reason
    usage = event.get("usage")
    if usage:
        result.reported_tokens = usage.get("completion_tokens")
        result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return False


async def stream_request(client, url: str, body: dict) -> RequestResult:
    """POST one streaming completion and time its tokens; failures are recorded, never raised."""
    result = RequestResult(sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
            else:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and _take_event(result, line[5:].strip(), time.perf_counter()):
                        break
    except Exception as err:  # a refused connection, a timeout, a broken stream: the round goes on
        result.error = f"{type(err).__name__}: {err}"
    result.done = time.perf_counter()
    return result


async def _client(client, url: str, bodies: list[dict]) -> list[RequestResult]:
    """One client: its requests one after another."""
    return [await stream_request(client, url, body) for body in bodies]


@dataclass
class Round:
    """What one round of concurrent clients gave."""

    by_client: list[list[RequestResult]]  # each client's requests, in the order it sent them
    start: float  # perf_counter when the first request was sent
    end: float  # perf_counter when the last stream ended
    rss_samples: list[tuple[float, int]]  # (perf_counter, server resident KiB) taken during the round
    # (perf_counter, bytes in the server's state cache) scraped from /metrics during the round, if asked
    cache_samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def results(self) -> list[RequestResult]:
        """Every request of the round, client by client."""
        return [r for results in self.by_client for r in results]

    def decode_window(self) -> tuple[float, float] | None:
        """When every client's first request was past its prompt (had a token) and none had ended yet.

        In that window the server holds one decoding row per client and prefills nothing: its memory then,
        against the same window with fewer clients, is what each decoding client costs. None if it never opened.
        """
        firsts = [results[0].arrivals[0] if results and results[0].arrivals else None for results in self.by_client]
        if not firsts or None in firsts:
            return None
        opened, closed = max(firsts), min(r.done for r in self.results)
        return (opened, closed) if opened < closed else None


async def _round(base_url: str, per_client: list[list[dict]], timeout: float, pid: int | None, cache: bool) -> Round:
    """Every client's requests at once, sampling the server's memory (and its state cache's size) meanwhile."""
    http = http_module()
    # One connection per client and a spare one for the /metrics poll.
    limits = http.Limits(max_connections=len(per_client) + 1, max_keepalive_connections=len(per_client) + 1)
    rss: list[tuple[float, int]] = []
    cached: list[tuple[float, float]] = []
    base_url = base_url.rstrip("/")
    # trust_env off: a proxy set in the environment must not sit between the clients and a local server.
    async with http.AsyncClient(timeout=http.Timeout(timeout), limits=limits, trust_env=False) as client:
        watchers = [asyncio.create_task(_sample_rss(pid, rss))] if pid else []
        if cache:
            watchers.append(asyncio.create_task(_poll_cache(client, base_url + "/metrics", cached)))
        start = time.perf_counter()
        done = await asyncio.gather(*(_client(client, base_url + "/v1/completions", bodies) for bodies in per_client))
        end = time.perf_counter()
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)  # each ends cancelled (or had ended on its own)
    return Round(list(done), start, end, rss, cached)


def run_round(
    base_url: str, per_client: list[list[dict]], timeout: float, pid: int | None = None, cache_metrics: bool = False
) -> Round:
    """Run `len(per_client)` concurrent streaming clients, each sending its list of request bodies in turn.

    pid: the server's process, whose resident memory is sampled; cache_metrics: also scrape the server's
    /metrics for its state cache's size (our servers; others simply give no samples).
    """
    return asyncio.run(_round(base_url, per_client, timeout, pid, cache_metrics))


async def _sample_rss(pid: int, samples: list[tuple[float, int]]) -> None:
    """Append (time, VmRSS KiB) of process pid every SAMPLE_S until cancelled."""
    while True:
        rss = read_status_kib(pid, "VmRSS")
        if rss is not None:
            samples.append((time.perf_counter(), rss))
        await asyncio.sleep(SAMPLE_S)


async def _poll_cache(client, url: str, samples: list[tuple[float, float]]) -> None:
    """Append (time, state-cache bytes) scraped from url every CACHE_SAMPLE_S until cancelled; never raises.

    The first answer that is not a 200 with the gauge in it, or a scrape that fails, ends the poll for the rest
    of the round: that server has no such metric (a baseline), or cannot be asked.
    """
    while True:
        try:
            response = await client.get(url)
            value = gauge_value(response.text, CACHE_METRIC) if response.status_code == 200 else None
        except Exception:  # a refused connection, a timeout: no cache figure for this round
            return
        if value is None:
            return
        samples.append((time.perf_counter(), value))
        await asyncio.sleep(CACHE_SAMPLE_S)


def gauge_value(text: str, name: str) -> float | None:
    """The value of the unlabelled metric `name` in Prometheus text; None where it is missing or unreadable."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def read_status_kib(pid: int, field_name: str) -> int | None:
    """A KiB figure of /proc/PID/status (VmRSS, VmHWM); None where there is no /proc or no such process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Set process pid's peak resident set (VmHWM) back to its current one (Linux >= 4.0); False if not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _inside(samples: list[tuple[float, float]], window: tuple[float, float] | None) -> list[float]:
    """The values of (time, value) samples taken inside window (none where there is no window)."""
    return [value for t, value in samples if window and window[0] <= t <= window[1]]


def summarize(round_: Round) -> dict:
    """A round's figures: tokens/s over its wall time, TTFT and ITL p50/p99 (s), errors, the memory sampled.

    decode_rss_mib is the server's largest resident set inside the decode window, decode_cache_mib its state
    cache's largest size there (None where it was not scraped or no sample fell inside the window).
    """
    ok = [r for r in round_.results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    wall = round_.end - round_.start
    tokens = sum(r.tokens for r in ok)
    window = round_.decode_window()
    decoding, cache = _inside(round_.rss_samples, window), _inside(round_.cache_samples, window)
    errors = [r.error for r in round_.results if r.error is not None]
    return {
        "requests": len(round_.results), "errors": len(errors), "first_error": errors[0] if errors else None,
        "output_tokens": tokens, "token_events": sum(len(r.arrivals) for r in ok), "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
        "decode_rss_mib": max(decoding) / 1024 if decoding else None,
        "decode_cache_mib": max(cache) / 2**20 if cache else None,
        "max_rss_mib": max(k for _, k in round_.rss_samples) / 1024 if round_.rss_samples else None,
    }  # fmt: skip
