"""`hippos bench layer`: the H3 layer against attention and the official plain path, and streaming.

Each (implementation, length, pass) is measured in a fresh process so that its peak memory is its own.
Records are plain dicts; the CLI prints them as a table and can write JSON and a plot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import ClassVar

import torch

from ..config import check_choices, check_device_name, check_numbers
from ..layers import H3, MultiHeadAttention
from .baselines import OfficialH3Port
from .measure import (
    PeakMemory,
    format_cells,
    machine_info,
    matmul_gflops,
    median_time,
    run_isolated,
    run_jobs,
    timed,
)

IMPLEMENTATIONS = ("hippos", "official", "attention")
LABELS = {
    "hippos": "hippos H3",
    "official": "official H3 (plain PyTorch port)",
    "attention": "attention (SDPA)",
}


@dataclass
class LayerBenchConfig:
    """What `hippos bench layer` measures."""

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)  # sequence lengths L
    d_model: int = 768  # layer width
    n_head: int = 12  # attention heads of the baseline (head size 64)
    batch: int = 1  # batch size
    repeats: int = 3  # timed calls per figure; the median is reported
    impls: tuple[str, ...] = IMPLEMENTATIONS  # which implementations to run
    stream_tokens: int = 1_000_000  # tokens streamed through one H3 layer (0: skip)
    stream_segment: int = 10_000  # tokens per forward call while streaming
    stream_marks: tuple[int, ...] = (100_000, 1_000_000)  # token counts at which speed and memory are read
    device: str = "cpu"  # torch device to run on (cpu, cuda, ...)
    seed: int = 0  # seed of the random weights and inputs

    POSITIVE: ClassVar[tuple[str, ...]] = ("lengths", "d_model", "n_head", "batch", "repeats", "stream_segment")

    def __post_init__(self) -> None:
        """Refuse unknown implementations and inconsistent sizes before any process starts."""
        check_numbers(self)
        check_choices("impls", self.impls, IMPLEMENTATIONS)
        if not self.lengths:
            raise ValueError("lengths must name at least one sequence length")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head {self.n_head} must divide d_model {self.d_model}")
        if self.stream_tokens and any(mark > self.stream_tokens for mark in self.stream_marks):
            raise ValueError(f"stream_marks {list(self.stream_marks)} must not pass stream_tokens {self.stream_tokens}")
        check_device_name(self.device)


def quick_config() -> LayerBenchConfig:
    """The short form `hippos demo` runs: two lengths, 100K streamed tokens."""
    return LayerBenchConfig(lengths=(512, 2048), repeats=3, stream_tokens=100_000, stream_marks=(20_000, 100_000))


def _build(impl: str, cfg: LayerBenchConfig):
    torch.manual_seed(cfg.seed)
    if impl == "attention":
        return MultiHeadAttention(cfg.d_model, cfg.n_head, device=cfg.device)
    layer = H3(cfg.d_model, device=cfg.device)
    return OfficialH3Port(layer) if impl == "official" else layer


def h3_flops(L: int, d_model: int, batch: int) -> float:
    """Forward FLOPs of the H3 layer's four projections, which dominate it (2 L D^2 each)."""
    return 4 * 2 * batch * L * d_model**2


def measure_layer(impl: str, L: int, backward: bool, cfg: LayerBenchConfig) -> dict:
    """Time and peak memory of one implementation at one length (forward, or forward + backward)."""
    torch.set_grad_enabled(True)
    module = _build(impl, cfg)
    x = torch.randn(cfg.batch, L, cfg.d_model, device=cfg.device, requires_grad=backward)
    grad = torch.randn(cfg.batch, L, cfg.d_model, device=cfg.device)
    params = list(module.parameters())

    def call():
        y = module(x)
        return y[0] if isinstance(y, tuple) else y

    def forward():
        with torch.inference_mode():
            call()

    def forward_backward():
        for p in params + [x]:
            p.grad = None
        call().backward(grad)

    fn = forward_backward if backward else forward
    with PeakMemory(cfg.device) as mem:  # the first call: memory of a cold process, also the warm-up
        _, first = timed(fn, cfg.device)
    repeats = 1 if first > 10 else cfg.repeats  # keep the longest baselines within minutes
    seconds = median_time(fn, repeats, cfg.device, warmup=0)
    mode = module.diag.resolve_mode(L) if impl == "hippos" else None
    return {
        "impl": impl,
        "L": L,
        "pass": "fwd+bwd" if backward else "fwd",
        "ms": seconds * 1e3,
        "peak_mib": mem.mib,
        "repeats": repeats,
        "mode": mode,
    }


def stream(cfg: LayerBenchConfig) -> list[dict]:
    """Stream cfg.stream_tokens random tokens through one H3 layer (chunked mode, inference)."""
    torch.manual_seed(cfg.seed)
    layer = H3(cfg.d_model, mode="chunked", device=cfg.device)
    marks, records = sorted(cfg.stream_marks), []
    state, done, busy = None, 0, 0.0
    with torch.inference_mode(), PeakMemory(cfg.device) as mem:
        while done < cfg.stream_tokens:
            n = min(cfg.stream_segment, cfg.stream_tokens - done)
            x = torch.randn(cfg.batch, n, cfg.d_model, device=cfg.device)
            (_, state), seconds = timed(partial(layer, x, state, return_state=True), cfg.device)
            busy += seconds
            done += n
            if marks and done >= marks[0]:
                marks.pop(0)
                records.append({"tokens": done, "tokens_per_s": done / busy, "peak_mib": mem.read()})
    return records


def run_layer_bench(cfg: LayerBenchConfig, progress=None) -> dict:
    """Every measurement of cfg, each in a fresh process; returns {"machine", "rows", "stream", ...}."""
    jobs = [
        ({"impl": impl, "L": L, "pass": "fwd+bwd" if bwd else "fwd"}, (impl, L, bwd, cfg))
        for L in cfg.lengths
        for impl in cfg.impls
        for bwd in (False, True)
    ]
    rows = run_jobs(measure_layer, jobs, progress)
    streamed = run_isolated(stream, cfg) if cfg.stream_tokens else []
    rate = matmul_gflops(cfg.device)
    return {
        "config": asdict(cfg),
        "machine": machine_info(cfg.device),
        "matmul_gflops": rate,
        "rows": rows,
        "stream": streamed,
    }


def summarize(result: dict) -> list[dict]:
    """One line per (L, pass): times of each implementation, hippos's speed-ups and its floor ratio."""
    cfg, rate = result["config"], result["matmul_gflops"]
    table = {}
    for r in result["rows"]:
        table.setdefault((r["L"], r["pass"]), {})[r["impl"]] = r
    lines = []
    for (L, kind), by_impl in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1] != "fwd")):
        line = {"L": L, "pass": kind}
        for impl, r in by_impl.items():
            line[f"{impl}_ms"], line[f"{impl}_mib"] = r.get("ms"), r.get("peak_mib")
        ours = by_impl.get("hippos")
        if ours and "ms" in ours:
            line["mode"] = ours["mode"]
            for other in ("official", "attention"):
                if "ms" in by_impl.get(other, {}):
                    line[f"x_vs_{other}"] = by_impl[other]["ms"] / ours["ms"]
            flops = h3_flops(L, cfg["d_model"], cfg["batch"]) * (3 if kind == "fwd+bwd" else 1)
            line["floor_ms"] = flops / (rate * 1e9) * 1e3
        lines.append(line)
    return lines


def format_table(result: dict, markdown: bool = False) -> str:
    """The summary as an aligned text table (or a Markdown one), followed by the streaming figures."""
    cols = [("L", "L", "{:d}"), ("pass", "pass", "{}")]
    for impl in result["config"]["impls"]:
        cols += [(f"{impl}_ms", f"{impl} ms", "{:.1f}"), (f"{impl}_mib", f"{impl} MiB", "{:.0f}")]
    cols += [
        ("x_vs_official", "x official", "{:.2f}"),
        ("x_vs_attention", "x attention", "{:.2f}"),
        ("floor_ms", "floor ms", "{:.1f}"),
        ("mode", "mode", "{}"),
    ]
    lines = summarize(result)
    cols = [c for c in cols if any(line.get(c[0]) is not None for line in lines)]
    cells = [[c[1] for c in cols]]
    for line in lines:
        cells.append([c[2].format(line[c[0]]) if line.get(c[0]) is not None else "-" for c in cols])
    out = format_cells(cells, markdown)
    failed = [r for r in result["rows"] if "error" in r]
    out += [f"failed: {r['impl']} L={r['L']} {r['pass']}: {r['error']}" for r in failed]
    for s in result["stream"]:
        peak = f"{s['peak_mib']:.0f} MiB" if s["peak_mib"] is not None else "unknown"
        out.append(f"stream: {s['tokens']:>9,d} tokens  {s['tokens_per_s']:>9,.0f} tokens/s  peak memory {peak}")
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    """Log-log plot of time against L for each implementation and pass (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("fwd", "fwd+bwd")):
        for impl in result["config"]["impls"]:
            rows = result["rows"]
            pts = sorted((r["L"], r["ms"]) for r in rows if r["impl"] == impl and r["pass"] == kind and "ms" in r)
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=LABELS[impl])
        ax.set_title(f"{kind}, d_model {result['config']['d_model']}, batch {result['config']['batch']}")
        ax.set_xlabel("sequence length L")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (ms)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
