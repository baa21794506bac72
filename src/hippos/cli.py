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


def _report(result: dict, table: str, json_path: str | None) -> None:
    """Print a benchmark's table and machine; write its record as JSON when asked."""
    m = result["machine"]
    print(table)
    print(f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {json_path}")


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
    _report(result, format_table(result, markdown=args.markdown), args.json)
    print(f"measured fp32 matmul rate: {result['matmul_gflops']:.0f} GFLOP/s")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


class _TextStreamer:
    """Prints generated text as it comes: decodes everything so far and writes the new part.

    Decoding the whole text (not token by token) keeps multi-byte characters intact; a trailing partial
    character (U+FFFD) is held back until its remaining bytes arrive.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout  # looked up now: stdout may be redirected
        self.ids: list[int] = []
        self.shown = 0

    def put(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown :])
        self.out.flush()
        self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.shown :] + "\n")
        self.out.flush()


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .data import load_tokenizer
    from .models import H3LM

    model = H3LM.from_pretrained(args.model, **({"n_head": args.n_head} if args.n_head else {}))
    name = args.tokenizer or ("gpt2" if model.config.vocab_size == 50257 else "bytes")
    tokenizer = load_tokenizer(name)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise ValueError(
            f"tokenizer {name!r} has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one character of text")
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    sys.stdout.write(args.prompt)
    model.generate(
        torch.tensor([ids]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        generator=generator,
        streamer=_TextStreamer(tokenizer),
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .models.official import load_official

    model = load_official(args.src, n_head=args.n_head)
    model.save_pretrained(args.dest)
    c = model.config
    print(
        f"converted {args.src} -> {args.dest}: d_model {c.d_model}, {c.n_layer} layers, attention at "
        f"{list(c.attn_layer_idx)}, {c.n_head} heads, {model.num_parameters():,} parameters"
    )
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from .benchmarks.generate import GenerateBenchConfig, format_table, quick_config, run_generate_bench

    cfg = from_overrides(GenerateBenchConfig, args, base=quick_config() if args.quick else None)
    print(
        f"generation benchmark: {cfg.preset} shape, batches {list(cfg.batches)}, prompts {list(cfg.prompts)}, "
        f"{cfg.new_tokens} new tokens, fp32 on {cfg.device}; every figure from a fresh process",
        flush=True,
    )
    result = run_generate_bench(cfg, progress=_progress_bar("bench generate"))
    _report(result, format_table(result, markdown=args.markdown), args.json)
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

    gen = sub.add_parser("generate", help="generate text from a prompt, streaming to the terminal")
    gen.add_argument("--model", required=True, help="save_pretrained directory, official .pt file or Hub id")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: 100)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set holding this mass")
    gen.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    gen.add_argument("--tokenizer", default=None, help="'bytes' or a Hugging Face tokenizer name or path "
                     "(default: gpt2 for GPT-2-vocabulary models, else bytes)")  # fmt: skip
    gen.add_argument("--n-head", type=int, default=None, help="attention heads, for official .pt files only")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="turn an official H3 checkpoint into a from_pretrained directory")
    conv.add_argument("src", help="official model.pt (plain, Lightning, old names or rotary)")
    conv.add_argument("dest", help="output directory (config.json + model.safetensors)")
    conv.add_argument("--n-head", type=int, default=None, help="attention heads (default: published table)")
    conv.set_defaults(func=_convert)

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

    from .benchmarks.generate import GenerateBenchConfig

    genb = bench.add_parser("generate", help="prefill/decode speed: H3, hybrid, Transformer vs HF GPT-2")
    genb.add_argument("--quick", action="store_true", help="short form: prompt 512, 32 new tokens")
    genb.add_argument("--json", help="write the figures as JSON here")
    genb.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    add_arguments(genb, GenerateBenchConfig)
    genb.set_defaults(func=_bench_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hippos` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:  # bad input, missing files, offline: no traceback
        print(f"hippos: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
