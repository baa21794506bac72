"""The `hippos` command: parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .config import add_arguments, from_overrides


def _progress_bar(total_desc: str):
    """A tqdm-driven progress callback: progress(done, total, what)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=total_desc, unit="run", dynamic_ncols=True)
        bar.n = done
        bar.set_postfix_str(what)
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _bench_layer(args: argparse.Namespace) -> int:
    from .benchmarks.layer import LayerBenchConfig, format_table, plot, quick_config, run_layer_bench

    cfg = from_overrides(LayerBenchConfig, args, base=quick_config() if args.quick else None)
    unknown = set(cfg.impls) - {"hippos", "official", "attention"}
    if unknown:
        raise SystemExit(f"unknown implementation(s) {sorted(unknown)}; choose from hippos, official, attention")
    print(
        f"H3 layer benchmark: d_model {cfg.d_model}, batch {cfg.batch}, L in {list(cfg.lengths)}, "
        f"fp32 on {cfg.device}; every figure from a fresh process",
        flush=True,
    )
    result = run_layer_bench(cfg, progress=_progress_bar("bench layer"))
    print(format_table(result, markdown=args.markdown))
    print(
        f"machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} threads, "
        f"matmul {result['matmul_gflops']:.0f} GFLOP/s, torch {result['machine']['torch']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    # For now the main job is the layer benchmark in its quick form; the synthetic-task reproduction
    # replaces it once training exists.
    ns = argparse.Namespace(quick=True, json=args.json, plot=args.plot, markdown=False)
    return _bench_layer(ns)


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface."""
    from .benchmarks.layer import LayerBenchConfig

    parser = argparse.ArgumentParser(prog="hippos", description="H3 state space language models.")
    parser.add_argument("--version", action="version", version=f"hippos {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on its built-in default (quick layer benchmark)")
    demo.add_argument("--json", help="also write the figures as JSON here")
    demo.add_argument("--plot", help="also write a log-log plot (PNG) here")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    layer = bench.add_parser("layer", help="H3 layer vs attention vs the official plain path; streaming")
    layer.add_argument(
        "--quick",
        action="store_true",
        help="short form: L = 512, 2048; 100K streamed tokens (what `hippos demo` runs)",
    )
    layer.add_argument("--json", help="write the figures as JSON here")
    layer.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    layer.add_argument("--plot", help="write a log-log plot of time against L (PNG) here")
    add_arguments(layer, LayerBenchConfig)
    layer.set_defaults(func=_bench_layer)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hippos` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad option values: say what is wrong, no traceback
        print(f"hippos: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
