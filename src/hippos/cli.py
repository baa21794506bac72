"""The `hippos` command: parsing and printing only; the work lives in the library.

Every option backed by a config dataclass has the dotted form `--section.field value` (`--train.steps 500`,
`--model.d_model 128`, `--bench.lengths 512,2048`), and commands that take a config also read it from a
TOML file with --config (one table per section). Plain options are the command's inputs (--model PATH,
--prompt, --out, --json, ...). Bad input is one line, `hippos: error: ...`, exit code 2, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from . import __version__
from .config import INT_MAX, add_section, dotted_flags, load_run, section_overrides

TOKENIZER_HELP = (
    "bytes, a Hugging Face tokenizer name or a folder (default, one rule for every command: the tokenizer the "
    "model's run recorded or its folder holds, else bytes for 257 ids, gpt2 for 50257)"
)


class _UsageError(Exception):
    """A command line that does not parse: main prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the problem, then where help is), without the usage block."""

    def error(self, message: str):
        """Raise the one-line error instead of printing usage and exiting (main prints it, returns 2)."""
        raise _usage_error(self.prog, message)


def _usage_error(prog: str, message: str) -> _UsageError:
    """The one line: the problem, then where help is."""
    return _UsageError(f"{prog}: error: {message} (see {prog} --help)")


# ---- argument types: each refuses bad text with a message argparse prints as the one error line ----------
def _integer(low: int):
    """An argparse type: an integer from `low` to INT_MAX."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= INT_MAX:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {INT_MAX}, got {value}")
        return value

    return parse


def _number(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with low_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            shown = f"{'above' if low_open else 'at least'} {low:g}" + (
                "" if high == math.inf else f" and at most {high:g}"
            )
            raise argparse.ArgumentTypeError(f"expected a finite number {shown}, got {text!r}")
        return value

    return parse


def _input_file(text: str) -> str:
    """An argparse type: a file that exists."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" + (" (it is a folder)" if Path(text).is_dir() else ""))
    return text


def _output_file(text: str) -> str:
    """An argparse type: where a result file goes (not a folder; its folder must exist)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder {path.parent} does not exist")
    return text


def _output_dir(text: str) -> str:
    """An argparse type: a folder to write into (it may not exist yet, but must not be a file)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; name a folder")
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise argparse.ArgumentTypeError(f"{text}: a part of that path is a file, not a folder")
    return text


# ---- printing ------------------------------------------------------------------------------------------------
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


def _write_json(path: str | None, record: dict) -> None:
    """Write a command's record as JSON when --json asked for it."""
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1, default=str)


def _report(result: dict, table: str, json_path: str | None) -> None:
    """Print a benchmark's table and machine; write its record as JSON when asked."""
    m = result["machine"]
    print(table)
    print(f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}")
    if json_path:
        _write_json(json_path, result)
        print(f"wrote {json_path}")


def _plot(plot, result: dict, path: str | None) -> None:
    """Draw a benchmark's plot with `plot(result, path)` when --plot asked for it."""
    if path:
        plot(result, path)
        print(f"wrote {path}")


def _report_runs(result: dict, table: str, args: argparse.Namespace, out: str, plot) -> int:
    """A training benchmark's table, the runs it reused and its wall time; its JSON record and plot if asked."""
    _report(result, table, args.json)
    reused = f"; {result['reused']} finished run(s) reused from {out}" if result["reused"] else ""
    print(f"wall time {result['wall_seconds']:.0f} s{reused}")
    _plot(plot, result, args.plot)
    return 0


def _bench_config(args: argparse.Namespace, cls: type, base=None):
    """A benchmark's config: base (or the defaults), then its --config file's [bench] table, then --bench.*."""
    bases = {"bench": base} if base is not None else None
    return load_run(args.config, {"bench": cls}, section_overrides(args), base=bases)["bench"]


# ---- the commands: each builds its inputs (every check first), calls the library, prints -------------------
def _demo(args: argparse.Namespace) -> int:
    from .benchmarks.synthetic import quick_config

    # The main job: the paper's Table 1 on this machine, in about ten minutes.
    cfg = quick_config() if args.out is None else dataclasses.replace(quick_config(), out=args.out)
    return _run_synthetic_bench(cfg, args.json, args.plot or f"{cfg.out}/curves.png", markdown=False)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .data.tokenizers import load_tokenizer
    from .generation import TextStreamer, generate
    from .models import H3LM
    from .models.quantize import quantize
    from .training.lm import check_tokenizer_fits
    from .training.run import default_tokenizer

    if not args.prompt:
        raise ValueError("the prompt is empty: give at least one character of text")
    model = H3LM.from_pretrained(args.model, **({"n_head": args.n_head} if args.n_head else {}))
    if args.quantize:
        model = quantize(model, args.quantize)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.config.vocab_size))
    check_tokenizer_fits(model.config, tokenizer)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    sys.stdout.write(args.prompt)
    generate(
        model,
        torch.tensor([tokenizer.encode(args.prompt)]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        generator=generator,
        streamer=TextStreamer(tokenizer),
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .models import H3LM

    model = H3LM.from_pretrained(args.src, n_head=args.n_head)
    model.save_pretrained(args.dest)
    c = model.config
    print(
        f"converted {args.src} -> {args.dest}: d_model {c.d_model}, {c.n_layer} layers, attention at "
        f"{list(c.attn_layer_idx)}, {c.n_head} heads, {model.num_parameters():,} parameters"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.run import is_main_process, prepare_run, run_summary, train_run

    run = prepare_run(args.config, args.out, args.resume, section_overrides(args))
    if is_main_process():
        print(run_summary(run, args.out), flush=True)
    metrics = train_run(_measured_peak(run), args.out, resume=args.resume, progress=not args.quiet)
    if is_main_process():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"done: {shown}; the model loads with hippos.H3LM.from_pretrained({args.out!r})")
    return 0


def _measured_peak(run: dict) -> dict:
    """A text run on a CPU without train.peak_tflops gets this machine's measured matmul rate, so that its log
    shows MFU (training counts FLOPs but does not measure: the probe lives in benchmarks)."""
    import torch

    from .benchmarks.measure import matmul_tflops

    train = run["train"]
    if "data" not in run or train.peak_tflops or torch.device(train.device).type != "cpu":
        return run
    return {**run, "train": dataclasses.replace(train, peak_tflops=matmul_tflops())}


def _eval_synthetic(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_examples
    from .models import H3LM
    from .training.run import synthetic_eval_data, synthetic_examples

    data = None if args.examples else synthetic_eval_data(args.model, args.task, section_overrides(args))
    model = H3LM.from_pretrained(args.model)
    examples, what = synthetic_examples(model.config, data, args.examples)
    result = evaluate_examples(model, examples)
    print(f"{args.model} on {what}: accuracy {100 * result['accuracy']:.2f}% over {result['examples']} examples, "
          f"loss {result['loss']:.4f}")  # fmt: skip
    _write_json(args.json, {"model": args.model, "data": what, **result})
    return 0


def _eval_ppl(args: argparse.Namespace) -> int:
    import torch

    from .config import check_device_name
    from .data.text import find_sources, tokenize_corpus
    from .data.tokenizers import load_tokenizer
    from .evaluation import perplexity
    from .models import H3LM
    from .models.quantize import quantize
    from .training.lm import check_tokenizer_fits
    from .training.run import default_tokenizer

    if args.stride is not None and args.stride > args.context:
        raise ValueError(f"--stride {args.stride} must not exceed --context {args.context}: tokens would be skipped")
    check_device_name(args.device)
    find_sources(args.data)  # a missing file is reported before the model is loaded
    model = H3LM.from_pretrained(args.model, device=args.device)
    if args.quantize:
        model = quantize(model, args.quantize)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.config.vocab_size))
    check_tokenizer_fits(model.config, tokenizer)
    corpus = tokenize_corpus(args.data, tokenizer, args.cache_dir, args.text_field, progress=not args.quiet)
    stride = args.stride or args.context
    with torch.inference_mode():
        result = perplexity(model, corpus.concatenated(), args.context, stride, args.batch_size, corpus.num_bytes,
                            not args.quiet)  # fmt: skip
    name = f"{args.model} ({args.quantize} weights)" if args.quantize else args.model
    print(f"{name} on {', '.join(args.data)} ({tokenizer.name} tokens, context {args.context}, stride {stride}): "
          f"perplexity {result['perplexity']:.3f}, {result['loss']:.4f} nats/token, "
          f"{result['bits_per_byte']:.4f} bits/byte over {result['tokens']:,} tokens")  # fmt: skip
    _write_json(args.json, {"model": args.model, "data": args.data, "tokenizer": tokenizer.name,
                            "context": args.context, "stride": stride, "quantize": args.quantize or "none",
                            **result})  # fmt: skip
    return 0


def _eval_harness(args: argparse.Namespace) -> int:
    from .evaluation import run_harness
    from .training.run import default_tokenizer

    tasks = [t for t in args.tasks.split(",") if t]
    tokenizer = args.tokenizer or default_tokenizer(args.model)
    out = run_harness(args.model, tasks, tokenizer, args.include_path, args.limit, args.batch_size, args.device)
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)  # fmt: skip
        print(f"{task}: {shown}")
    _write_json(args.json, {"model": args.model, "results": out["results"]})
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from .data.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(args.data, args.vocab_size, args.out, args.text_field, args.min_frequency, not args.quiet)
    print(f"trained a byte-level BPE tokenizer of {tok.vocab_size} ids -> {args.out} "
          f"(use it with --data.tokenizer {args.out} or --tokenizer {args.out})")  # fmt: skip
    return 0


def _bench_layer(args: argparse.Namespace) -> int:
    from .benchmarks.layer import LayerBenchConfig, format_table, plot, quick_config, run_layer_bench

    cfg = _bench_config(args, LayerBenchConfig, quick_config() if args.quick else None)
    print(f"H3 layer benchmark: d_model {cfg.d_model}, batch {cfg.batch}, L in {list(cfg.lengths)}, fp32 on "
          f"{cfg.device}; every figure from a fresh process", flush=True)  # fmt: skip
    result = run_layer_bench(cfg, progress=_progress_bar("bench layer"))
    _report(result, format_table(result, markdown=args.markdown), args.json)
    print(f"measured fp32 matmul rate: {result['matmul_gflops']:.0f} GFLOP/s")
    _plot(plot, result, args.plot)
    return 0


def _bench_synthetic(args: argparse.Namespace) -> int:
    from .benchmarks.synthetic import SyntheticBenchConfig, mqar_config, quick_config

    base = mqar_config() if args.mqar else quick_config() if args.quick else None
    cfg = _bench_config(args, SyntheticBenchConfig, base)
    return _run_synthetic_bench(cfg, args.json, args.plot, args.markdown)


def _run_synthetic_bench(cfg, json_path: str | None, plot_path: str | None, markdown: bool) -> int:
    """The synthetic benchmark (and `hippos demo`): say what runs, run it, print and write the results."""
    from .benchmarks.synthetic import format_table, plot, run_synthetic_bench

    print(
        f"synthetic in-context learning: {', '.join(cfg.models)} x {', '.join(cfg.tasks)}, d_model "
        f"{'/'.join(map(str, cfg.d_models))}, {len(cfg.seeds)} seed(s): {len(cfg.runs())} runs of at most "
        f"{cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr or 'per task'}, loss on {cfg.loss_on} positions), "
        f"stopping at {100 * cfg.stop_at:g}% test accuracy, {cfg.jobs} at a time; runs in {cfg.out}",
        flush=True,
    )
    result = run_synthetic_bench(cfg, progress=True)
    args = argparse.Namespace(json=json_path, plot=plot_path)
    return _report_runs(result, format_table(result, markdown=markdown), args, cfg.out, plot)


def _bench_lm(args: argparse.Namespace) -> int:
    from .benchmarks.lm import LMBenchConfig, format_table, plot, run_lm_bench

    cfg = _bench_config(args, LMBenchConfig)
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    print(f"language modeling: {', '.join(cfg.models)} on {', '.join(cfg.datasets)}, d_model {cfg.d_model}, "
          f"{tokens:,} training tokens each, {cfg.jobs} at a time; runs in {cfg.out}", flush=True)  # fmt: skip
    result = run_lm_bench(cfg, progress=True)
    return _report_runs(result, format_table(result, markdown=args.markdown), args, cfg.out, plot)


def _bench_train(args: argparse.Namespace) -> int:
    from .benchmarks.train_speed import TrainBenchConfig, format_table, run_train_bench

    cfg = _bench_config(args, TrainBenchConfig)
    print(f"training speed at the {cfg.preset} shape: {', '.join(cfg.models)}, lengths "
          f"{', '.join(map(str, cfg.lengths))}, batch {cfg.batch}, on {cfg.device}", flush=True)  # fmt: skip
    result = run_train_bench(cfg, progress=_progress_bar("train bench"))
    _report(result, format_table(result, markdown=args.markdown), args.json)
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from .benchmarks.generate import GenerateBenchConfig, format_table, quick_config, run_generate_bench

    cfg = _bench_config(args, GenerateBenchConfig, quick_config() if args.quick else None)
    print(f"generation benchmark: {cfg.preset} shape, batches {list(cfg.batches)}, prompts {list(cfg.prompts)}, "
          f"{cfg.new_tokens} new tokens, {'int8 weights' if cfg.quantize == 'int8' else 'fp32'} on {cfg.device}; "
          "every figure from a fresh process",
          flush=True)  # fmt: skip
    result = run_generate_bench(cfg, progress=_progress_bar("bench generate"))
    _report(result, format_table(result, markdown=args.markdown), args.json)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from .benchmarks.serve import ServeBenchConfig, format_table, plot, quick_config, run_serve_bench

    cfg = _bench_config(args, ServeBenchConfig, quick_config() if args.quick else None)
    print(f"serving benchmark: {', '.join(cfg.models)} at the {cfg.preset} shape, {list(cfg.clients)} concurrent "
          f"streaming clients, prompts of {cfg.prompt_tokens} tokens, {cfg.new_tokens} new tokens; a fresh server "
          "per round, on 127.0.0.1", flush=True)  # fmt: skip
    result = run_serve_bench(cfg, progress=_progress_bar("bench serve"))
    _report(result, format_table(result, markdown=args.markdown), args.json)
    print(f"wall time {result['wall_seconds']:.0f} s")
    _plot(plot, result, args.plot)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .config import check_device_name
    from .data.tokenizers import load_tokenizer
    from .models import H3LM
    from .serving.server import ServeConfig, check_serve_extra, serve, with_address
    from .training.lm import check_tokenizer_fits
    from .training.run import default_tokenizer

    config = load_run(args.config, {"serve": ServeConfig}, section_overrides(args))["serve"]
    config = with_address(config, args.host, args.port, args.api_key)
    check_serve_extra()
    check_device_name(args.device)
    model = H3LM.from_pretrained(args.model, device=args.device)
    if args.quantize:
        from .models.quantize import quantize

        model = quantize(model, args.quantize)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.config.vocab_size))
    check_tokenizer_fits(model.config, tokenizer)
    path = Path(args.model)
    name = args.served_model_name or (path.stem if path.is_file() else path.name)
    return serve(model, tokenizer, name, config)


# ---- the parser: one builder per subcommand ------------------------------------------------------------------
def _leaf(parser: argparse.ArgumentParser, func) -> None:
    """Make `parser` run `func`; errors found after parsing point at its help (`hippos bench layer --help`)."""
    parser.set_defaults(func=func, prog=parser.prog)


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="the main job: the paper's Table 1 (H3, S4D, attention, hybrid on associative recall and induction "
        "head), about 10 minutes on 2 CPU cores",
    )
    demo.add_argument("--out", type=_output_dir, default=None,
                      help="directory of the runs (default: runs/demo; finished runs reused)")  # fmt: skip
    demo.add_argument("--json", type=_output_file, help="also write the results as JSON here")
    demo.add_argument(
        "--plot", type=_output_file, help="training curves (PNG; default: curves.png in the runs' directory)"
    )
    _leaf(demo, _demo)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from a prompt, streaming to the terminal")
    gen.add_argument("--model", required=True, help="save_pretrained directory, official .pt file or Hub id")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=_integer(1), default=100, help="tokens to generate (default: 100)")
    gen.add_argument("--temperature", type=_number(0), default=1.0, help="0 is greedy (default: 1.0)")
    gen.add_argument("--top-k", type=_integer(1), default=None, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=_number(0, 1, low_open=True), default=None,
                     help="sample from the smallest set holding this mass (0 < p <= 1)")  # fmt: skip
    gen.add_argument("--seed", type=_integer(0), default=None, help="random seed, for reproducible sampling")
    gen.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    gen.add_argument("--n-head", type=_integer(1), default=None, help="attention heads, for official .pt files only")
    gen.add_argument("--quantize", choices=("int8",), default=None,
                     help="run with int8 weights (hippos.quantize; docs/quantization.md)")  # fmt: skip
    _leaf(gen, _generate)


def _add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="turn an official H3 checkpoint into a from_pretrained directory")
    conv.add_argument("src", type=_input_file, help="official model.pt (plain, Lightning, old names or rotary)")
    conv.add_argument("dest", type=_output_dir, help="output directory (config.json + model.safetensors)")
    conv.add_argument("--n-head", type=_integer(1), default=None, help="attention heads (default: published table)")
    _leaf(conv, _convert)


def _add_train(sub) -> None:
    from .models import H3Config
    from .training import TrainConfig
    from .training.lm import LMDataConfig
    from .training.synthetic import SyntheticDataConfig

    tr = sub.add_parser(
        "train",
        help="train a model from a TOML run file (configs/)",
        usage="hippos train [--config FILE] --out DIR [--resume] [--quiet] [--SECTION.FIELD VALUE ...]",
        description="Train a model. Any field of the run file can be overridden: --model.d_model 128, "
        "--task.seq_len 40, --data.seq_len 512, --train.steps 500, ... (the sections below). Several "
        "processes: torchrun --nproc_per_node N -m hippos train ...",
    )
    tr.add_argument("--config", type=_input_file, metavar="FILE", help="TOML run file: [model], [train] and "
                    "either [task] (a synthetic task) or [data] (text: language modeling); see configs/")  # fmt: skip
    tr.add_argument("--out", type=_output_dir, required=True,
                    help="run directory: log.jsonl, checkpoints, the trained model")  # fmt: skip
    tr.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    model = add_section(tr, "model", H3Config)
    model.add_argument("--model.preset", dest="model.preset", metavar="NAME",
                       help="start from a named configuration (H3Config.preset: tiny, H3-125M, ...)")  # fmt: skip
    add_section(tr, "task", SyntheticDataConfig)
    add_section(tr, "data", LMDataConfig)
    add_section(tr, "train", TrainConfig)
    _leaf(tr, _train)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval", required=True)
    _add_eval_synthetic(ev)
    _add_eval_ppl(ev)
    evh = ev.add_parser("harness", help="lm-evaluation-harness tasks through the Hugging Face wrapper")
    evh.add_argument("--model", required=True, help="save_pretrained folder or `hippos train` run directory")
    evh.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    evh.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    evh.add_argument("--include-path", default=None, help="folder of task YAML files (local tasks, offline data)")
    evh.add_argument("--limit", type=_integer(1), default=None, help="at most this many examples per task")
    evh.add_argument("--batch-size", type=_integer(1), default=1, help="requests per forward pass (default 1)")
    evh.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evh.add_argument("--json", type=_output_file, help="also write the results as JSON here")
    _leaf(evh, _eval_harness)


def _add_eval_synthetic(ev) -> None:
    from .training.synthetic import SyntheticDataConfig

    evs = ev.add_parser("synthetic", help="accuracy on a synthetic task's test split or on an examples file")
    evs.add_argument("--model", required=True, help="save_pretrained directory (a `hippos train` --out)")
    evs.add_argument("--task", default=None, help="associative_recall, induction_head, mqar or a paper preset "
                     "(mqar_64, ...); default: the task the model was trained on")  # fmt: skip
    evs.add_argument("--examples", type=_input_file,
                     help=".npz file of inputs, targets, graded (hippos.data.synthetic format)")  # fmt: skip
    evs.add_argument("--json", type=_output_file, help="also write the result as JSON here")
    overrides = "the task's fields, over the task the model was trained on or the --task named"
    add_section(evs, "task", SyntheticDataConfig, skip=("task",), description=overrides, defaults=False)
    _leaf(evs, _eval_synthetic)


def _add_eval_ppl(ev) -> None:
    evp = ev.add_parser("ppl", help="perplexity and bits per byte on text, with a sliding window")
    evp.add_argument("--model", required=True, help="save_pretrained directory, Hub id or official .pt file")
    evp.add_argument("--data", required=True, nargs="+", help="text files, folders, globs, .jsonl or hf:NAME[:SPLIT]")
    evp.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    evp.add_argument("--context", type=_integer(2), default=1024, help="tokens per window (default 1024)")
    evp.add_argument("--stride", type=_integer(1), default=None, help="tokens between windows (default: the context)")
    evp.add_argument("--batch-size", type=_integer(1), default=8, help="windows per forward pass (default 8)")
    evp.add_argument("--text-field", default="text", help="the text's field in .jsonl files and datasets")
    evp.add_argument("--cache-dir", type=_output_dir, default=None,
                     help="tokenized text cache (default $HIPPOS_CACHE or ~/.cache/hippos)")  # fmt: skip
    evp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evp.add_argument("--json", type=_output_file, help="also write the result as JSON here")
    evp.add_argument("--quiet", action="store_true", help="no progress bars")
    evp.add_argument("--quantize", choices=("int8",), default=None,
                     help="evaluate with int8 weights (hippos.quantize; docs/quantization.md)")  # fmt: skip
    _leaf(evp, _eval_ppl)


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tokenizer", required=True)
    tokt = tok.add_parser("train", help="train a byte-level BPE tokenizer on a corpus (the tokenizers library)")
    tokt.add_argument("--data", required=True, nargs="+", help="text files, folders, globs, .jsonl or hf:NAME[:SPLIT]")
    tokt.add_argument("--vocab-size", type=_integer(258), required=True,
                      help="ids in the vocabulary, end-of-text included (at least 258)")  # fmt: skip
    tokt.add_argument("--out", type=_output_dir, required=True,
                      help="folder for tokenizer.json (loads with --tokenizer FOLDER)")  # fmt: skip
    tokt.add_argument("--min-frequency", type=_integer(1), default=2, help="a merge must occur this often (default 2)")
    tokt.add_argument("--text-field", default="text", help="the text's field in .jsonl files and datasets")
    tokt.add_argument("--quiet", action="store_true", help="no progress bar")
    _leaf(tokt, _tokenizer_train)


def _bench_parser(bench, name: str, help: str, cls: type, func, plot: str | None = None, quick: str | None = None):
    """A `hippos bench NAME` parser: --config, --json, --markdown, --plot and --quick where the benchmark has
    them, and cls's fields as --bench.FIELD."""
    parser = bench.add_parser(name, help=help, description=f"{help}. Settings: --bench.FIELD value (below), or a "
                              "[bench] table in a TOML file given with --config.")  # fmt: skip
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--config", type=_input_file, metavar="FILE",
                        help="TOML file with a [bench] table of the fields below")  # fmt: skip
    parser.add_argument("--json", type=_output_file, help="write the results as JSON here")
    if plot:
        parser.add_argument("--plot", type=_output_file, help=f"write {plot} (PNG) here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    add_section(parser, "bench", cls)
    _leaf(parser, func)
    return parser


def _add_bench(sub) -> None:
    from .benchmarks.generate import GenerateBenchConfig
    from .benchmarks.layer import LayerBenchConfig
    from .benchmarks.lm import LMBenchConfig
    from .benchmarks.serve import ServeBenchConfig
    from .benchmarks.synthetic import SyntheticBenchConfig
    from .benchmarks.train_speed import TrainBenchConfig

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _bench_parser(bench, "layer", "H3 layer vs attention vs the official plain path; streaming", LayerBenchConfig,
                  _bench_layer, plot="a log-log plot of time against L",
                  quick="short form: L = 512, 2048; 100K streamed tokens (what `hippos demo` runs)")  # fmt: skip
    synb = _bench_parser(bench, "synthetic", "paper Table 1 (and --mqar: the MQAR grid): train and score",
                         SyntheticBenchConfig, _bench_synthetic, plot="the training curves",
                         quick="one seed, what `hippos demo` runs")  # fmt: skip
    synb.add_argument("--mqar", action="store_true", help="the MQAR grid: H3, hybrid, attention at d_model 64/128")
    _bench_parser(bench, "train", "forward+backward speed: H3, hybrid vs HF GPT-2 at the 125M shape",
                  TrainBenchConfig, _bench_train)  # fmt: skip
    _bench_parser(bench, "lm", "language modeling on text: Transformer, H3, hybrid, S4D at ~7M parameters",
                  LMBenchConfig, _bench_lm, plot="the loss curves")  # fmt: skip
    _bench_parser(bench, "generate", "prefill/decode speed: H3, hybrid, Transformer vs HF GPT-2",
                  GenerateBenchConfig, _bench_generate, quick="short form: prompt 512, 32 new tokens")  # fmt: skip
    _bench_parser(bench, "serve", "HTTP serving under 1-32 streaming clients: hippos serve vs transformers serve",
                  ServeBenchConfig, _bench_serve, plot="output tokens/s against clients",
                  quick="smoke run: tiny preset, 1 and 4 clients, short prompts")  # fmt: skip


def _add_serve(sub) -> None:
    from .serving.server import ServeConfig

    srv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server: /v1/completions, /v1/models, /health, /metrics",
        description="Serve a model over HTTP (OpenAI's completions API; streaming as server-sent events) until "
        "Ctrl-C, which lets running requests finish. Limits: --serve.FIELD value (below), or a [serve] table in a "
        'TOML file given with --config. Needs the serve extra: pip install "hungry-hippos[serve]".',
    )
    srv.add_argument("--model", required=True, help="save_pretrained directory, official .pt file or Hub id")
    srv.add_argument("--quantize", choices=("int8",), default=None, help="int8 weights (hippos.quantize) first")
    srv.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_integer(0), default=None, help="TCP port (default 8000; 0: any free one)")
    srv.add_argument("--api-key", default=os.environ.get("HIPPOS_API_KEY"), metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                     "$HIPPOS_API_KEY, which keeps the key out of the process list)")  # fmt: skip
    srv.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    srv.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the model name clients send (default: the model folder's name)")  # fmt: skip
    srv.add_argument("--device", default="cpu", help="torch device (default cpu)")
    srv.add_argument("--config", type=_input_file, metavar="FILE",
                     help="TOML file with a [serve] table of the settings below")  # fmt: skip
    add_section(srv, "serve", ServeConfig, skip=("host", "port", "api_key"))
    _leaf(srv, _serve)


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface."""
    parser = _Parser(prog="hippos", description="H3 state space language models.")
    parser.add_argument("--version", action="version", version=f"hippos {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_generate, _add_convert, _add_train, _add_eval, _add_tokenizer, _add_bench, _add_serve):
        add(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The parsed command line; an unknown option is named with what the command takes instead."""
    args, extra = parser.parse_known_args(dotted_flags(argv))
    if not extra:
        return args
    flag = extra[0].partition("=")[0]
    section, dot, key = flag.removeprefix("--").partition(".")
    settings = [name for name in vars(args) if "." in name]
    known = sorted(name.partition(".")[2] for name in settings if name.startswith(f"{section}."))
    if flag.startswith("--") and dot and known:
        raise _usage_error(args.prog, f"unknown key {section}.{key}; known: {', '.join(known)}")
    if flag.startswith("--") and dot:
        sections = ", ".join(sorted({f"--{name.partition('.')[0]}.FIELD" for name in settings})) or "none"
        raise _usage_error(args.prog, f"unknown option {flag}; this command's settings: {sections}")
    hint = [name for name in settings if name.partition(".")[2] == flag.removeprefix("--").replace("-", "_")]
    spelled = f"; settings are spelled --{hint[0]}" if hint else ""
    raise _usage_error(args.prog, f"unrecognized arguments: {' '.join(extra)}{spelled}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hippos` console script; returns the exit code (2: bad input, 130: interrupted)."""
    try:
        args = _parse(build_parser(), sys.argv[1:] if argv is None else argv)
    except _UsageError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:  # bad input, missing files, offline: no traceback
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # one line, for logs and scripts
        print(f"hippos: error: {'; '.join(lines) or type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training has written a checkpoint of every finished step by now
        resume = " (continue with --resume)" if args.func is _train else ""
        print(f"\nhippos: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
