"""`hippos serve`: the server's settings, and running the app under uvicorn until Ctrl-C.

Importing this module imports neither FastAPI nor uvicorn (the command line reads ServeConfig for its help);
`serve` imports them, with a clear message when the `serve` extra is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from ..config import check_numbers

INSTALL_HINT = 'pip install "hungry-hippos[serve]"'


@dataclass
class ServeConfig:
    """Where `hippos serve` listens and how much it takes on."""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface; put a proxy with TLS in front)
    port: int = 8000  # TCP port (0: any free one; the address is printed)
    api_key: str | None = None  # when set, every request but /health needs 'Authorization: Bearer KEY'
    max_running: int = 16  # requests decoded together at most (rows of the running batch)
    max_queue: int = 64  # requests waiting for a row at most; beyond that a request gets 429 and Retry-After
    max_prompt_tokens: int = 4096  # longest prompt taken, in tokens (longer: 400)
    max_tokens: int = 1024  # the largest max_tokens a request may ask for (more: 400)
    max_body_bytes: int = 1 << 20  # largest request body taken, in bytes (larger: 413)
    cache_bytes: int = 1 << 30  # state cache budget in bytes: prompts that resend a conversation skip prefill
    prefill_chunk: int = 512  # prompt tokens prefilled per engine step, so running requests keep decoding

    POSITIVE = ("max_running", "max_queue", "max_prompt_tokens", "max_tokens", "max_body_bytes", "prefill_chunk")

    def __post_init__(self) -> None:
        check_numbers(self)
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"host must name an address to listen on (127.0.0.1, 0.0.0.0, ::1), got {self.host!r}")
        if self.port > 65535:
            raise ValueError(f"port must be from 0 to 65535 (0: any free port), got {self.port}")
        key = self.api_key
        if key is not None and (not isinstance(key, str) or not key or any(c.isspace() for c in key)):
            raise ValueError("api_key must be a non-empty string without spaces (or None for no key)")

    def url(self, port: int | None = None) -> str:
        """The base URL of the API (IPv6 addresses in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if port is None else port}/v1"


def serve(model, tokenizer, name: str, config: ServeConfig, quiet: bool = False) -> int:
    """Serve `model` over HTTP as `name` until Ctrl-C (or SIGTERM); in-flight requests finish first. Returns 0.

    tokenizer: what `hippos.data.tokenizers.load_tokenizer` returns; its EOS ends a completion.
    """
    check_serve_extra()
    import uvicorn

    app = build_app(model, tokenizer, name, config)
    # timeout_graceful_shutdown None: on Ctrl-C uvicorn stops accepting, then waits for every open response
    options = {"host": config.host, "port": config.port, "timeout_graceful_shutdown": None, "lifespan": "on"}
    server = _announcing_server(uvicorn)(uvicorn.Config(app, log_level="warning" if quiet else "info", **options))
    server.announce = lambda port: print(f"serving {name} at {config.url(port)} (Ctrl-C stops it)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it caught, after draining
        server.run()
    return 0


def build_app(model, tokenizer, name: str, config: ServeConfig):
    """The FastAPI app serving `model` through a new engine (app.state.engine) with config's limits."""
    from .app import create_app
    from .engine import Engine, EngineConfig

    engine_config = EngineConfig(max_running=config.max_running, max_queue=config.max_queue,
                                 prefill_chunk=config.prefill_chunk, cache_bytes=config.cache_bytes)  # fmt: skip
    return create_app(Engine(model, engine_config), tokenizer, name, config, model.config.vocab_size)


def _announcing_server(uvicorn):
    """uvicorn.Server that calls self.announce(port) once it listens (the port is the real one when 0 was asked)."""

    class AnnouncingServer(uvicorn.Server):
        announce = None

        async def startup(self, sockets=None) -> None:
            """uvicorn's startup, then the announcement."""
            await super().startup(sockets=sockets)
            if self.servers and self.announce is not None and not self.should_exit:
                self.announce(self.servers[0].sockets[0].getsockname()[1])

    return AnnouncingServer


def with_address(config: ServeConfig, host: str | None, port: int | None, api_key: str | None) -> ServeConfig:
    """config with the address and key given as plain command-line options (None: keep config's)."""
    given = {"host": host, "port": port, "api_key": api_key}
    return dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})


def check_serve_extra() -> None:
    """Refuse early (before a model loads) when FastAPI, uvicorn or prometheus_client is missing."""
    from importlib.util import find_spec

    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if find_spec(name) is None]
    if missing:
        raise ImportError(f"`hippos serve` needs {', '.join(missing)}: {INSTALL_HINT}")
