"""The `hippos` command: parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import __version__
from .config import INT_MAX, add_arguments, from_overrides

TOKENIZER_HELP = (
    "bytes, a Hugging Face tokenizer name or a folder (default, one rule for every command: the tokenizer the "
    "model's run recorded or its folder holds, else bytes for 257 ids, gpt2 for 50257)"
)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the problem, then where help is), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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

    from .data.tokenizers import default_tokenizer, load_tokenizer
    from .models import H3LM
    from .training.lm import check_tokenizer_fits

    if not args.prompt:
        raise ValueError("the prompt is empty: give at least one character of text")
    model = H3LM.from_pretrained(args.model, **({"n_head": args.n_head} if args.n_head else {}))
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.config.vocab_size))
    check_tokenizer_fits(model.config, tokenizer)
    ids = tokenizer.encode(args.prompt)
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


def _train_sections(args: argparse.Namespace, overrides: list[str]) -> dict:
    """The run's typed sections: from --config (or, with --resume alone, the run's own run.json) + overrides.

    A [data] table makes it a language-modeling run, a [task] table a synthetic one.
    """
    from pathlib import Path

    from .config import load_run, read_run_file
    from .data.tokenizers import load_tokenizer
    from .models import H3Config
    from .training import TrainConfig
    from .training.lm import LMDataConfig
    from .training.synthetic import SyntheticDataConfig

    path = args.config
    if path is None:
        recorded = Path(args.out) / "run.json"
        if not (args.resume and recorded.is_file()):
            raise ValueError("give --config FILE (see configs/), or --resume with an --out directory holding run.json")
        path = _recorded_tables(recorded)
    tables = path if isinstance(path, dict) else read_run_file(path)
    if "data" not in tables and "task" not in tables:
        raise ValueError(f"{path} has neither a [task] table (a synthetic task) nor a [data] table (text to learn); "
                         "see configs/ for examples")  # fmt: skip
    lm = "data" in tables
    second = {"data": LMDataConfig} if lm else {"task": SyntheticDataConfig}
    # The model table is built once the data is known: its vocabulary comes from the data by default.
    run = load_run(path, {"model": H3Config, **second, "train": TrainConfig}, overrides, build={"model": dict})
    vocab = load_tokenizer(run["data"].tokenizer).vocab_size if lm else run["task"].spec().model_vocab_size
    run["model"] = H3Config.from_table(run["model"], vocab)
    return run


def _check_run_dir(out: Path, resume: bool) -> None:
    """Refuse to start a fresh run over a finished or interrupted one (its files would be overwritten)."""
    if not resume and (out / "run.json").exists():
        raise ValueError(f"{out} already holds a run (run.json): pass --resume to continue it, or choose another --out")


def _recorded_tables(path) -> dict:
    """A run.json's model, data (or task) and train tables, as a run file would hold them (for --resume alone)."""
    with open(path) as f:
        record = json.load(f)
    model = {k: v for k, v in record["model"].items() if k != "model_type"}
    second = "task" if "task" in record["data"] else "data"  # a synthetic run records its task as "data"
    return {"model": model, second: record["data"], "train": record["train"]}


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .training.lm import run_lm
    from .training.synthetic import run_synthetic

    run = _train_sections(args, overrides)
    _check_run_dir(Path(args.out), args.resume)
    if "data" in run:  # the text exists (example data is fetched now), before anything is printed
        run["data"].check_sources()
    model, train = run["model"], run["train"]
    mixers = ", ".join(model.mixer(i) for i in range(model.n_layer))
    if "data" in run:
        what = f"text ({', '.join(run['data'].train)}; tokenizer {run['data'].tokenizer}, L {run['data'].seq_len})"
    else:
        spec = run["task"].spec()
        what = f"{spec.name} (V {spec.vocab_size}, L {spec.seq_len})"
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"training {model.n_layer}-layer d_model {model.d_model} ({mixers}) on {what}: {train.steps} steps of "
            f"{train.batch_size}, lr {train.lr:g}, on {train.device} -> {args.out}",
            flush=True,
        )
    runner = run_lm if "data" in run else run_synthetic
    metrics = runner(
        model, run.get("data") or run["task"], train, args.out, resume=args.resume, progress=not args.quiet
    )
    if int(os.environ.get("RANK", "0")) == 0:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"done: {shown}; the model loads with hippos.H3LM.from_pretrained({args.out!r})")
    return 0


def _eval_synthetic(args: argparse.Namespace) -> int:
    import dataclasses

    from .data.synthetic import PAPER_TASKS, load_examples, make_splits
    from .evaluation import evaluate_examples
    from .models import H3LM
    from .training.synthetic import SyntheticDataConfig, check_vocabulary, data_config_of_run

    model = H3LM.from_pretrained(args.model)
    if args.examples:
        examples, what = load_examples(args.examples), args.examples
    else:
        data = data_config_of_run(args.model) if args.task is None else None
        if data is None:
            name = args.task or "associative_recall"
            if name in PAPER_TASKS:
                data = SyntheticDataConfig.from_task(PAPER_TASKS[name])
            else:
                data = SyntheticDataConfig(task=name)
        changes = {k: getattr(args, k) for k in ("vocab_size", "seq_len", "num_pairs", "num_queries", "n_test", "seed")}
        data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
        spec = data.spec()
        check_vocabulary(model.config, spec)
        examples = make_splits(spec, data.n_train, data.n_test, data.seed)[1]
        what = (
            f"{spec.name} (V {spec.vocab_size}, L {spec.seq_len}, pairs {spec.pairs}), test split of seed {data.seed}"
        )
    result = evaluate_examples(model, examples)
    print(f"{args.model} on {what}: accuracy {100 * result['accuracy']:.2f}% over {result['examples']} examples, "
          f"loss {result['loss']:.4f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": what, **result}, f, indent=1)
    return 0


def _eval_ppl(args: argparse.Namespace) -> int:
    import torch

    from .config import check_device_name
    from .data.text import find_sources, tokenize_corpus
    from .data.tokenizers import default_tokenizer, load_tokenizer
    from .evaluation.perplexity import perplexity
    from .models import H3LM
    from .training.lm import check_tokenizer_fits

    if args.stride is not None and args.stride > args.context:
        raise ValueError(f"--stride {args.stride} must not exceed --context {args.context}: tokens would be skipped")
    check_device_name(args.device)
    find_sources(args.data)  # a missing file is reported before the model is loaded
    model = H3LM.from_pretrained(args.model, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.config.vocab_size))
    check_tokenizer_fits(model.config, tokenizer)
    corpus = tokenize_corpus(args.data, tokenizer, args.cache_dir, args.text_field, progress=not args.quiet)
    tokens = corpus.concatenated()
    stride = args.stride or args.context
    with torch.inference_mode():
        result = perplexity(model, tokens, args.context, stride, args.batch_size, corpus.num_bytes, not args.quiet)
    print(f"{args.model} on {', '.join(args.data)} ({tokenizer.name} tokens, context {args.context}, stride {stride}): "
          f"perplexity {result['perplexity']:.3f}, {result['loss']:.4f} nats/token, "
          f"{result['bits_per_byte']:.4f} bits/byte over {result['tokens']:,} tokens")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": args.data, "tokenizer": tokenizer.name, "context": args.context,
                       "stride": stride, **result}, f, indent=1)  # fmt: skip
    return 0


def _eval_harness(args: argparse.Namespace) -> int:
    from .evaluation.harness import run_harness

    tasks = [t for t in args.tasks.split(",") if t]
    out = run_harness(args.model, tasks, args.tokenizer, args.include_path, args.limit, args.batch_size, args.device)
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)  # fmt: skip
        print(f"{task}: {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "results": out["results"]}, f, indent=1, default=str)
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from .data.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(args.data, args.vocab_size, args.out, args.text_field, args.min_frequency, not args.quiet)
    print(f"trained a byte-level BPE tokenizer of {tok.vocab_size} ids -> {args.out} "
          f"(use it with --data.tokenizer {args.out} or --tokenizer {args.out})")  # fmt: skip
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


def _bench_synthetic(args: argparse.Namespace) -> int:
    from .benchmarks.synthetic import (
        SyntheticBenchConfig,
        format_table,
        mqar_config,
        plot,
        quick_config,
        run_synthetic_bench,
    )

    base = mqar_config() if args.mqar else quick_config() if args.quick else SyntheticBenchConfig()
    cfg = from_overrides(SyntheticBenchConfig, args, base=base)
    cfg.validate()
    runs = len(cfg.runs())
    print(
        f"synthetic in-context learning: {', '.join(cfg.models)} x {', '.join(cfg.tasks)}, d_model "
        f"{'/'.join(map(str, cfg.d_models))}, {len(cfg.seeds)} seed(s): {runs} runs of at most {cfg.steps} steps "
        f"(batch {cfg.batch_size}, lr {cfg.lr or 'per task'}, loss on {cfg.loss_on} positions), stopping at "
        f"{100 * cfg.stop_at:g}% test accuracy, {cfg.jobs} at a time; runs in {cfg.out}",
        flush=True,
    )
    result = run_synthetic_bench(cfg, progress=True)
    return _report_runs(result, format_table(result, markdown=args.markdown), args, cfg.out, plot)


def _report_runs(result: dict, table: str, args: argparse.Namespace, out: str, plot) -> int:
    """A training benchmark's table, the runs it reused and its wall time; its JSON record and plot if asked."""
    _report(result, table, args.json)
    reused = f"; {result['reused']} finished run(s) reused from {out}" if result["reused"] else ""
    print(f"wall time {result['wall_seconds']:.0f} s{reused}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _bench_lm(args: argparse.Namespace) -> int:
    from .benchmarks.lm import LMBenchConfig, format_table, plot, run_lm_bench

    cfg = from_overrides(LMBenchConfig, args)
    cfg.validate()
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    print(f"language modeling: {', '.join(cfg.models)} on {', '.join(cfg.datasets)}, d_model {cfg.d_model}, "
          f"{tokens:,} training tokens each, {cfg.jobs} at a time; runs in {cfg.out}", flush=True)  # fmt: skip
    result = run_lm_bench(cfg, progress=True)
    return _report_runs(result, format_table(result, markdown=args.markdown), args, cfg.out, plot)


def _bench_train(args: argparse.Namespace) -> int:
    from .benchmarks.train_speed import TrainBenchConfig, format_table, run_train_bench

    cfg = from_overrides(TrainBenchConfig, args)
    print(f"training speed at the {cfg.preset} shape: {', '.join(cfg.models)}, lengths "
          f"{', '.join(map(str, cfg.lengths))}, batch {cfg.batch}, on {cfg.device}", flush=True)  # fmt: skip
    result = run_train_bench(cfg, progress=_progress_bar("train bench"))
    _report(result, format_table(result, markdown=args.markdown), args.json)
    return 0


def _demo(args: argparse.Namespace) -> int:
    # The main job: the paper's Table 1 on this machine, in about ten minutes.
    plot = args.plot or f"{args.out or 'runs/demo'}/curves.png"
    ns = argparse.Namespace(quick=True, mqar=False, json=args.json, plot=plot, markdown=False, out=args.out)
    return _bench_synthetic(ns)


def _bench_parser(bench, name: str, help: str, cls: type, func, plot: str | None = None):
    """A `hippos bench NAME` parser: --json, --markdown, --plot (when the benchmark draws one) and cls's fields."""
    parser = bench.add_parser(name, help=help)
    parser.add_argument("--json", type=_output_file, help="write the results as JSON here")
    if plot:
        parser.add_argument("--plot", type=_output_file, help=f"write {plot} (PNG) here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    add_arguments(parser, cls)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface."""
    from .benchmarks.layer import LayerBenchConfig

    parser = _Parser(prog="hippos", description="H3 state space language models.")
    parser.add_argument("--version", action="version", version=f"hippos {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

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
    demo.set_defaults(func=_demo)

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
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="turn an official H3 checkpoint into a from_pretrained directory")
    conv.add_argument("src", type=_input_file, help="official model.pt (plain, Lightning, old names or rotary)")
    conv.add_argument("dest", type=_output_dir, help="output directory (config.json + model.safetensors)")
    conv.add_argument("--n-head", type=_integer(1), default=None, help="attention heads (default: published table)")
    conv.set_defaults(func=_convert)

    tr = sub.add_parser(
        "train",
        help="train a model from a TOML run file (configs/)",
        description="Train a model. Any field of the run file can be overridden: --model.d_model 128, "
        "--task.seq_len 40, --data.seq_len 512, --train.steps 500, ... Several processes: torchrun "
        "--nproc_per_node N -m hippos train ...",
    )
    tr.add_argument("--config", type=_input_file, help="TOML run file: [model], [train] and either [task] (a "
                    "synthetic task) or [data] (text: language modeling); see configs/")  # fmt: skip
    tr.add_argument("--out", type=_output_dir, required=True,
                    help="run directory: log.jsonl, checkpoints, the trained model")  # fmt: skip
    tr.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train, takes_overrides=True)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval", required=True)
    evs = ev.add_parser("synthetic", help="accuracy on a synthetic task's test split or on an examples file")
    evs.add_argument("--model", required=True, help="save_pretrained directory (a `hippos train` --out)")
    evs.add_argument("--task", default=None, help="associative_recall, induction_head, mqar or a paper preset "
                     "(mqar_64, ...); default: the task the model was trained on")  # fmt: skip
    for flag, low in (
        ("vocab-size", 1),
        ("seq-len", 1),
        ("num-pairs", 0),
        ("num-queries", 0),
        ("n-test", 1),
        ("seed", 0),
    ):
        evs.add_argument(f"--{flag}", type=_integer(low), default=None, help=f"the task's {flag.replace('-', '_')}")
    evs.add_argument("--examples", type=_input_file,
                     help=".npz file of inputs, targets, graded (hippos.data.synthetic format)")  # fmt: skip
    evs.add_argument("--json", type=_output_file, help="also write the result as JSON here")
    evs.set_defaults(func=_eval_synthetic)
    evp = ev.add_parser("ppl", help="perplexity and bits per byte on text, with a sliding window")
    evp.add_argument("--model", required=True, help="save_pretrained directory, Hub id or official .pt file")
    evp.add_argument("--data", required=True, nargs="+", help="text files, folders, globs, .jsonl or hf:NAME[:SPLIT]")
    evp.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    evp.add_argument("--context", type=_integer(2), default=1024, help="tokens per window (default 1024)")
    evp.add_argument("--stride", type=_integer(1), default=None, help="tokens between windows (default: the context)")
    evp.add_argument("--batch-size", type=_integer(1), default=8, help="windows per forward pass (default 8)")
    evp.add_argument("--text-field", default="text", help="the text's field in .jsonl files and datasets")
    evp.add_argument(
        "--cache-dir", type=_output_dir, default=None,
        help="tokenized text cache (default $HIPPOS_CACHE or ~/.cache/hippos)",
    )  # fmt: skip
    evp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evp.add_argument("--json", type=_output_file, help="also write the result as JSON here")
    evp.add_argument("--quiet", action="store_true", help="no progress bars")
    evp.set_defaults(func=_eval_ppl)

    evh = ev.add_parser("harness", help="lm-evaluation-harness tasks through the Hugging Face wrapper")
    evh.add_argument("--model", required=True, help="save_pretrained folder or `hippos train` run directory")
    evh.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    evh.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    evh.add_argument("--include-path", default=None, help="folder of task YAML files (local tasks, offline data)")
    evh.add_argument("--limit", type=_integer(1), default=None, help="at most this many examples per task")
    evh.add_argument("--batch-size", type=_integer(1), default=1, help="requests per forward pass (default 1)")
    evh.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evh.add_argument("--json", type=_output_file, help="also write the results as JSON here")
    evh.set_defaults(func=_eval_harness)

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
    tokt.set_defaults(func=_tokenizer_train)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    layer = bench.add_parser("layer", help="H3 layer vs attention vs the official plain path; streaming")
    layer.add_argument(
        "--quick",
        action="store_true",
        help="short form: L = 512, 2048; 100K streamed tokens (what `hippos demo` runs)",
    )
    layer.add_argument("--json", type=_output_file, help="write the figures as JSON here")
    layer.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    layer.add_argument("--plot", type=_output_file, help="write a log-log plot of time against L (PNG) here")
    add_arguments(layer, LayerBenchConfig)
    layer.set_defaults(func=_bench_layer)

    from .benchmarks.synthetic import SyntheticBenchConfig

    synb = _bench_parser(bench, "synthetic", "paper Table 1 (and --mqar: the MQAR grid): train and score",
                         SyntheticBenchConfig, _bench_synthetic, plot="the training curves")  # fmt: skip
    synb.add_argument("--quick", action="store_true", help="one seed, what `hippos demo` runs")
    synb.add_argument("--mqar", action="store_true", help="the MQAR grid: H3, hybrid, attention at d_model 64/128")

    from .benchmarks.lm import LMBenchConfig
    from .benchmarks.train_speed import TrainBenchConfig

    _bench_parser(bench, "train", "forward+backward speed: H3, hybrid vs HF GPT-2 at the 125M shape",
                  TrainBenchConfig, _bench_train)  # fmt: skip
    _bench_parser(bench, "lm", "language modeling on text: Transformer, H3, hybrid, S4D at ~7M parameters",
                  LMBenchConfig, _bench_lm, plot="the loss curves")  # fmt: skip

    from .benchmarks.generate import GenerateBenchConfig

    genb = bench.add_parser("generate", help="prefill/decode speed: H3, hybrid, Transformer vs HF GPT-2")
    genb.add_argument("--quick", action="store_true", help="short form: prompt 512, 32 new tokens")
    genb.add_argument("--json", type=_output_file, help="write the figures as JSON here")
    genb.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    add_arguments(genb, GenerateBenchConfig)
    genb.set_defaults(func=_bench_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hippos` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) if getattr(args, "takes_overrides", False) else args.func(args)
    except (ValueError, OSError, ImportError) as err:  # bad input, missing files, offline: no traceback
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # one line, for logs and scripts
        print(f"hippos: error: {'; '.join(lines) or type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training has written a checkpoint of every finished step by now
        resume = " (continue with --resume)" if getattr(args, "func", None) is _train else ""
        print(f"\nhippos: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
