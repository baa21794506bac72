"""`hippos bench serve`: our HTTP server under concurrent streaming clients, against `transformers serve`.

For every model and every number of clients a fresh server starts (a `hippos serve` or a `transformers serve
--continuous-batching` subprocess on 127.0.0.1, see servers.py), takes one warm-up request, and then serves
one round: every client sends its streaming requests at once (prompts of random token ids, the same ones for
every server). The round gives output tokens/s, time to first token and inter-token latency p50/p99 (load.py),
the server's peak resident memory during the round, and its resident memory while every client's request was
decoding (past its prompt, not yet finished), from which the memory each extra decoding client costs
follows; for our servers, also the part of it their state cache holds (read from /metrics), reported apart
(see memory_per_client). In the server of the fewest clients a second-turn row follows: a long prompt with a
short reply, then the whole conversation with a follow-up sent again, and the two times to first token.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from ..config import check_choices, check_numbers
from ..models.config import PRESETS
from .load import http_module, read_status_kib, reset_peak_rss, run_round, summarize
from .measure import format_cells, machine_info
from .servers import (
    ServerProcess,
    encode_words,
    free_port,
    prepare_model,
    prompt_text,
    second_turn_prompt,
    served_name,
    server_command,
)

MODELS = ("h3", "hybrid", "transformer", "gpt2")
LABELS = {
    "h3": "hippos serve: pure H3",
    "hybrid": "hippos serve: hybrid",
    "transformer": "hippos serve: Transformer",
    "gpt2": "transformers serve --continuous-batching: GPT-2",
}
WARMUP_TOKENS = 4  # new tokens of the warm-up request that every server answers before its round
TARGETS = {"hybrid_x_baseline": 2.0, "h3_memory_x_state": 2.0, "second_turn_speedup": 5.0}


@dataclass
class ServeBenchConfig:
    """What `hippos bench serve` measures."""

    preset: str = "H3-125M"  # model shape: every server's model gets this width and depth (random weights)
    models: tuple[str, ...] = MODELS  # servers: h3, hybrid, transformer (hippos serve), gpt2 (transformers serve)
    clients: tuple[int, ...] = (1, 8, 32)  # concurrent streaming clients: one round each, a fresh server each
    prompt_tokens: int = 512  # tokens of every prompt of a round
    new_tokens: int = 128  # tokens generated per request (no end-of-text token: every request runs to this)
    requests_per_client: int = 1  # requests each client of a round sends, one after another
    second_turn_tokens: int = 2048  # first prompt of the second-turn row (0: no second-turn row)
    second_turn_new_tokens: int = 32  # tokens generated in each turn of that row, and its follow-up's length
    quantize: str = "none"  # none or int8: our models' weights (hippos serve --quantize)
    cache_bytes: int = 1 << 30  # our servers' state-cache budget (--serve.cache_bytes; 0: no cache)
    timeout: float = 1800.0  # seconds one request may take before it counts as failed
    startup_timeout: float = 300.0  # seconds a server may take to start answering /health
    seed: int = 0  # seed of the random weights and prompts

    POSITIVE: ClassVar[tuple[str, ...]] = ("clients", "prompt_tokens", "new_tokens", "requests_per_client",
                                           "second_turn_new_tokens", "timeout", "startup_timeout")  # fmt: skip

    def __post_init__(self) -> None:
        check_numbers(self)
        check_choices("preset", (self.preset,), PRESETS)
        check_choices("models", self.models, MODELS)
        check_choices("quantize", (self.quantize,), ("none", "int8"))
        if not self.clients:
            raise ValueError("clients must name at least one number of concurrent clients, e.g. 1,8,32")
        if len(set(self.clients)) != len(self.clients) or len(set(self.models)) != len(self.models):
            raise ValueError("clients and models must not repeat an entry; each is measured once")


def quick_config() -> ServeBenchConfig:
    """A smoke run for tests: the tiny preset, 1 and 4 clients, short prompts and replies."""
    return ServeBenchConfig(preset="tiny", clients=(1, 4), prompt_tokens=32, new_tokens=8, second_turn_tokens=128,
                            second_turn_new_tokens=8, timeout=120.0, startup_timeout=120.0)  # fmt: skip


def request_body(kind: str, name: str, ids: list[int], max_tokens: int) -> dict:
    """A greedy streaming completion request; transformers serve takes text prompts, ours token ids."""
    body = {"model": name, "prompt": prompt_text(ids) if kind == "gpt2" else ids, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True}  # fmt: skip
    if kind != "gpt2":
        body["stream_options"] = {"include_usage": True}
    return body


class _Prompts:
    """Random prompts (token ids) from a seed: every server of one client count gets the same ones."""

    def __init__(self, seed: int, clients: int, vocab: int):
        self.rng, self.vocab = random.Random(seed * 1_000_003 + clients), vocab

    def ids(self, n: int) -> list[int]:
        """n random token ids."""
        return [self.rng.randrange(self.vocab) for _ in range(n)]


def _one(url: str, body: dict, timeout: float):
    """One streaming request on its own; an error is raised with what the server said."""
    result = run_round(url, [[body]], timeout).results[0]
    if result.error is not None:
        raise RuntimeError(f"request failed: {result.error}")
    return result


def second_turn(url: str, kind: str, name: str, folder: Path, cfg: ServeBenchConfig, prompts: _Prompts) -> dict:
    """Turn 1: a long prompt and a short reply; turn 2: that conversation plus a follow-up. Both TTFTs."""
    n = cfg.second_turn_new_tokens
    first_prompt = prompts.ids(cfg.second_turn_tokens)
    first = _one(url, request_body(kind, name, first_prompt, n), cfg.timeout)
    reply = encode_words(folder, first.text)  # what the client would resend: the reply as it read it
    conversation = first_prompt + reply + prompts.ids(n)
    second = _one(url, request_body(kind, name, conversation, n), cfg.timeout)
    return {
        "turn1_prompt_tokens": len(first_prompt), "turn2_prompt_tokens": len(conversation),
        "turn1_ttft_s": first.ttft, "turn2_ttft_s": second.ttft,
        "speedup": first.ttft / second.ttft if first.ttft and second.ttft else None,
        "turn2_cached_tokens": second.cached_tokens, "reply_tokens": len(reply),
    }  # fmt: skip


def _warm_up(server: ServerProcess, kind: str, folder: Path, cfg: ServeBenchConfig, prompts: _Prompts) -> str:
    """Ready, named and warm: the served model's name after one request of a round's prompt length."""
    http = http_module()
    server.wait_ready(cfg.startup_timeout, http)
    name = served_name(server, kind, folder, http)
    ids = prompts.ids(cfg.prompt_tokens)
    if encode_words(folder, prompt_text(ids)) != ids:  # the text prompts must be the same tokens as the ids
        raise RuntimeError("the benchmark's tokenizer does not turn the prompt text back into its ids")
    try:
        _one(server.url, request_body(kind, name, ids, WARMUP_TOKENS), cfg.timeout)
    except RuntimeError as err:
        raise RuntimeError(f"warm-up {err}; server output: {server.log_tail(600)}") from None
    return name


def measure_round(kind: str, folder: Path, clients: int, cfg: ServeBenchConfig, vocab: int, logs: Path) -> dict:
    """One fresh server, its warm-up, one round of `clients` concurrent clients (and the second turn if asked)."""
    port = free_port()
    prompts = _Prompts(cfg.seed, clients, vocab)
    command = server_command(kind, folder, port, clients, cfg)
    with ServerProcess(command, port, logs / f"{kind}-{clients}.log") as server:
        started = time.perf_counter()
        name = _warm_up(server, kind, folder, cfg, prompts)
        ready_s = time.perf_counter() - started
        peak_reset = reset_peak_rss(server.pid)
        bodies = [[request_body(kind, name, prompts.ids(cfg.prompt_tokens), cfg.new_tokens)
                   for _ in range(cfg.requests_per_client)] for _ in range(clients)]  # fmt: skip
        round_ = run_round(server.url, bodies, cfg.timeout, server.pid, cache_metrics=kind != "gpt2")  # ours: /metrics
        row = {"model": kind, "clients": clients, "startup_s": ready_s, **summarize(round_)}
        hwm = read_status_kib(server.pid, "VmHWM")
        row["peak_rss_mib"] = hwm / 1024 if hwm is not None else None
        row["peak_since"] = "round start" if peak_reset else "server start"
        if cfg.second_turn_tokens and clients == min(cfg.clients):
            row["second_turn"] = second_turn(server.url, kind, name, folder, cfg, prompts)
    return row


def _positions(cfg: ServeBenchConfig) -> int:
    """Positions GPT-2 needs: the longest prompt plus what is generated after it."""
    return max(cfg.prompt_tokens + cfg.new_tokens, second_turn_prompt(cfg) + cfg.second_turn_new_tokens) + 8


def run_serve_bench(cfg: ServeBenchConfig, progress=None) -> dict:
    """Every (model, clients) round of cfg, each against a fresh server; progress(done, total, what)."""
    http_module()  # no HTTP client: say so before any model is built
    started, rows, models = time.perf_counter(), [], {}
    total = len(cfg.models) * len(cfg.clients)
    with tempfile.TemporaryDirectory(prefix="hippos-bench-serve-") as tmp:
        for kind in cfg.models:
            folder = Path(tmp) / kind
            try:
                models[kind] = prepare_model(kind, cfg.preset, folder, _positions(cfg), cfg.seed)
            except Exception as err:  # a missing baseline library: the other servers still run
                rows += [{"model": kind, "clients": c, "error": f"{type(err).__name__}: {err}"} for c in cfg.clients]
                continue
            for clients in cfg.clients:
                if progress:
                    progress(len(rows), total, f"{kind} x {clients}")
                try:
                    rows.append(measure_round(kind, folder, clients, cfg, models[kind]["vocab_size"], Path(tmp)))
                except (RuntimeError, OSError, ValueError) as err:
                    rows.append({"model": kind, "clients": clients, "error": str(err)})
            shutil.rmtree(folder)
    if progress:
        progress(total, total, "done")
    result = {"config": asdict(cfg), "machine": machine_info(), "models": models, "rows": rows}
    return {**result, "memory": memory_per_client(result), "wall_seconds": time.perf_counter() - started}


def memory_per_client(result: dict) -> dict:
    """Per model: resident MiB each client beyond the fewest adds while every client's request decodes.

    mib_per_client is the whole resident set's growth. Where our server reported its state cache's size at both
    ends, that splits into cache_mib_per_client (the prompt states the cache keeps for follow-ups) and
    decode_mib_per_client (the rest: what decoding itself costs). The cache is reported apart because it is a
    separate feature bounded by its own budget (--serve.cache_bytes): once full it stops growing with clients,
    so its share says nothing about decoding; with `--bench.cache_bytes 0` the servers run without it.
    """
    out = {}
    for kind in result["config"]["models"]:
        rows = sorted((r for r in _ok(result, kind) if r.get("decode_rss_mib")), key=lambda r: r["clients"])
        if len(rows) >= 2 and rows[-1]["clients"] > rows[0]["clients"]:
            first, last = rows[0], rows[-1]
            state = result["models"].get(kind, {}).get("state_bytes")
            mem = out[kind] = {"mib_per_client": _slope(first, last, "decode_rss_mib"),
                               "between": [first["clients"], last["clients"]],
                               "state_mib": state / 2**20 if state else None}  # fmt: skip
            if first.get("decode_cache_mib") is not None and last.get("decode_cache_mib") is not None:
                mem["cache_mib_per_client"] = _slope(first, last, "decode_cache_mib")
                # the slope of (resident - cache) is the difference of the two slopes
                mem["decode_mib_per_client"] = mem["mib_per_client"] - mem["cache_mib_per_client"]
    return out


def _slope(first: dict, last: dict, key: str) -> float:
    """How much the rows' figure `key` grows per client from row first to row last."""
    return (last[key] - first[key]) / (last["clients"] - first["clients"])


def _ok(result: dict, kind: str) -> list[dict]:
    """The rows of one model that ran without an error."""
    return [r for r in result["rows"] if r["model"] == kind and "error" not in r]


def _num(value, scale: float = 1.0, digits: int = 2) -> str:
    """A figure for the tables ("n/a" when it could not be measured)."""
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


def _round_cells(result: dict) -> list[list[str]]:
    """One table row per round: throughput, latencies, memory, tokens that arrived of those asked for."""
    cfg = result["config"]
    base = {r["clients"]: r["tokens_per_s"] for r in _ok(result, "gpt2")}
    cells = [["server", "clients", "output tok/s", "x baseline", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms",
              "ITL p99 ms", "peak MiB", "decode MiB", "tokens"]]  # fmt: skip
    for r in (r for r in result["rows"] if "error" not in r):
        asked = r["requests"] * cfg["new_tokens"]
        cells.append([
            LABELS[r["model"]], str(r["clients"]), _num(r["tokens_per_s"], digits=1),
            _num(r["tokens_per_s"] / base[r["clients"]]) if base.get(r["clients"]) else "-",
            _num(r["ttft_p50_s"]), _num(r["ttft_p99_s"]), _num(r["itl_p50_s"], 1e3, 1), _num(r["itl_p99_s"], 1e3, 1),
            _num(r["peak_rss_mib"], digits=0), _num(r["decode_rss_mib"], digits=0),
            f"{r['output_tokens']}/{asked}" + (f" ({r['errors']} failed)" if r["errors"] else ""),
        ])  # fmt: skip
    return cells


def _turn_cells(result: dict) -> list[list[str]]:
    """One row per server that ran the second turn."""
    cells = [["server", "turn 1 prompt", "turn 1 TTFT s", "turn 2 prompt", "turn 2 TTFT s", "speed-up", "cached"]]
    for r in result["rows"]:
        t = r.get("second_turn")
        if t:
            cached = "n/a" if t["turn2_cached_tokens"] is None else str(t["turn2_cached_tokens"])
            cells.append([LABELS[r["model"]], str(t["turn1_prompt_tokens"]), _num(t["turn1_ttft_s"]),
                          str(t["turn2_prompt_tokens"]), _num(t["turn2_ttft_s"], digits=3),
                          _num(t["speedup"], digits=1), cached])  # fmt: skip
    return cells


def targets(result: dict) -> list[tuple[str, float | None, bool | None]]:
    """The issue's targets as (what, measured, met): None where the run lacks what a target needs."""
    most = max(result["config"]["clients"])
    speed = {r["model"]: r["tokens_per_s"] for r in result["rows"] if r["clients"] == most and "error" not in r}
    ratio = speed["hybrid"] / speed["gpt2"] if speed.get("hybrid") and speed.get("gpt2") else None
    out = [(f"hybrid output tokens/s at {most} clients / the baseline's (>= {TARGETS['hybrid_x_baseline']:g})", ratio,
            None if ratio is None else ratio >= TARGETS["hybrid_x_baseline"])]  # fmt: skip
    out.append(_h3_memory_target(result["memory"].get("h3", {})))
    for r in result["rows"]:
        t = r.get("second_turn")
        if t and r["model"] != "gpt2":
            goal = TARGETS["second_turn_speedup"]
            met = None if t["speedup"] is None else t["speedup"] >= goal
            out.append((f"{LABELS[r['model']]}: turn-1 TTFT / turn-2 TTFT (>= {goal:g})", t["speedup"], met))
    return out


def _h3_memory_target(mem: dict) -> tuple[str, float | None, bool | None]:
    """Pure H3's MiB per extra decoding client over its state's: without the state cache where that was measured."""
    goal = TARGETS["h3_memory_x_state"]
    if "decode_mib_per_client" in mem:
        what, mib = "pure H3 decode MiB per extra client (resident less the state cache)", mem["decode_mib_per_client"]
    else:  # the cache's size was not measured: the whole resident set, under its own label
        what, mib = "pure H3 resident MiB per extra client", mem.get("mib_per_client")
    x_state = mib / mem["state_mib"] if mib is not None and mem.get("state_mib") else None
    return f"{what} / its state's MiB (<= {goal:g})", x_state, None if x_state is None else x_state <= goal


def _memory_line(kind: str, m: dict) -> str:
    """One model's resident MiB per extra decoding client, and the state cache's part of it where measured."""
    line = (f"{LABELS[kind]}: {m['mib_per_client']:.2f} MiB resident per extra decoding client "
            f"({m['between'][0]} vs {m['between'][1]} clients)")  # fmt: skip
    if "cache_mib_per_client" in m:
        line += (f", of which {m['cache_mib_per_client']:.2f} MiB the state cache's (prompt states kept for "
                 f"follow-ups): {m['decode_mib_per_client']:.2f} MiB apart from it")  # fmt: skip
    return line + (f"; one row's state {m['state_mib']:.2f} MiB" if m["state_mib"] else "")


def format_table(result: dict, markdown: bool = False) -> str:
    """The rounds, the second turns, memory per client, the targets and any failures, as text or Markdown."""
    out = format_cells(_round_cells(result), markdown)
    turns = _turn_cells(result)
    if len(turns) > 1:
        out += ["", "second turn (in the server of the fewest clients, after its round):"]
        out += format_cells(turns, markdown)
    out.append("")
    out += [_memory_line(kind, m) for kind, m in result["memory"].items()]
    for what, value, met in targets(result):
        verdict = "n/a (not measured)" if met is None else f"{value:.2f}: {'met' if met else 'NOT met'}"
        out.append(f"target: {what}: {verdict}")
    out += [f"failed: {LABELS[r['model']]} x {r['clients']}: {r['error']}" for r in result["rows"] if "error" in r]
    out += [f"errors in {LABELS[r['model']]} x {r['clients']}: {r['first_error']}"
            for r in result["rows"] if r.get("first_error")]  # fmt: skip
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    """Output tokens/s against concurrent clients, one line per server (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in result["config"]["models"]:
        pts = sorted((r["clients"], r["tokens_per_s"]) for r in _ok(result, kind))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS[kind])
    cfg = result["config"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(cfg["clients"]), [str(c) for c in cfg["clients"]])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{cfg['preset']} shape, prompts of {cfg['prompt_tokens']}, {cfg['new_tokens']} new tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
