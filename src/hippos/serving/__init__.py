"""Serving: the inference engine (continuous batching over typed states) and the state cache (docs/serving.md).

Nothing here imports an optional dependency; the HTTP app that fronts the engine lives beside it.
"""

from .cache import StateCache
from .engine import (
    CompletionRequest,
    Engine,
    EngineConfig,
    EngineStats,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)

__all__ = [
    "CompletionRequest",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "QueueFullError",
    "RequestHandle",
    "StateCache",
    "TokenEvent",
]
