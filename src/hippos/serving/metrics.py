"""Prometheus metrics of the server: the engine's figures, read from `engine.stats()` at every scrape.

Each app has its own CollectorRegistry (never prometheus_client's global one), so two servers in one process,
as in the tests, do not share or double-register metrics. Names and meanings: docs/serving.md, "The HTTP
server".
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "hippos"


class EngineCollector:
    """A custom collector: gauges and counters taken from one `engine.stats()` snapshot per scrape."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def describe(self):
        """Nothing up front: the registry then calls collect() only at scrape time."""
        return []

    def collect(self):
        """Yield the metric families of the current engine snapshot."""
        s = self.engine.stats()
        gauges = {
            "queue_requests": ("requests waiting for a row of the running batch", s.queued),
            "running_requests": ("requests in the running batch (rows decoded together)", s.running),
            "tokens_per_second": ("generated tokens per second over the last ~10 s", s.tokens_per_second),
            "state_cache_bytes": ("bytes held by the state cache", s.cache_bytes),
            "state_cache_entries": ("states held by the state cache", s.cache_entries),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = {
            "prompt_tokens": ("prompt tokens received", s.prompt_tokens),
            "cached_prompt_tokens": ("prompt tokens served from the state cache", s.prompt_tokens - s.prefilled_tokens),
            "prefilled_tokens": ("prompt tokens prefilled (not found in the state cache)", s.prefilled_tokens),
            "generated_tokens": ("tokens generated", s.generated_tokens),
            "state_cache_hits": ("requests that found a cached state for a prefix of their prompt", s.cache_hits),
            "state_cache_misses": ("requests that found no cached state", s.cache_misses),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        finished = CounterMetricFamily(f"{PREFIX}_requests_finished", "requests finished, by reason", labels=["reason"])
        for reason, count in sorted(s.requests_finished.items()):
            finished.add_metric([reason], count)
        yield finished


class Metrics:
    """The server's registry: the engine's figures plus HTTP responses counted by status code."""

    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.registry.register(self)
        self.responses: Counter[int] = Counter()  # status code -> responses (only the event loop writes it)

    def count_response(self, status: int) -> None:
        """Count one HTTP response."""
        self.responses[status] += 1

    def describe(self):
        """Nothing up front (see EngineCollector.describe)."""
        return []

    def collect(self):
        """The HTTP responses by status code."""
        family = CounterMetricFamily(f"{PREFIX}_http_responses", "HTTP responses, by status code", labels=["status"])
        for status, count in sorted(self.responses.items()):
            family.add_metric([str(status)], count)
        yield family

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
