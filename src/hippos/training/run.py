"""Run assembly for the command line: a run's typed sections, its summary, and the one tokenizer-default rule.

`hippos train` reads a TOML run file (or, with --resume alone, the run.json its run directory holds), applies
`--section.field value` overrides and trains; `hippos generate`, `eval ppl` and `eval harness` pick a model's
tokenizer with `default_tokenizer`; `hippos eval synthetic` rebuilds a run's test split (`synthetic_eval_data`,
`synthetic_examples`).
The command line only parses and prints: what it runs is here, where tests and scripts can call it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import load_run, read_run_file
from ..data.synthetic import PAPER_TASKS, load_examples, make_splits
from ..data.tokenizers import load_tokenizer
from ..models import H3Config
from .lm import LMDataConfig, run_lm
from .loop import TrainConfig
from .synthetic import SyntheticDataConfig, check_vocabulary, data_config_of_run, run_synthetic

BYTES_VOCAB, GPT2_VOCAB = 257, 50257


def default_tokenizer(model_dir, vocab_size: int | None = None) -> str:
    """The tokenizer of a model when none is named: one rule for every command (generate, eval ppl, harness).

    1. "bytes" when the model's run recorded it (run.json of a `hippos train` run directory);
    2. the model folder itself when it holds tokenizer files (runs save theirs; so do Hugging Face folders);
    3. the name its run recorded;
    4. by vocabulary size: 257 ids are bytes, 50257 are GPT-2's ("gpt2");
    otherwise there is no sensible default, and a ValueError asks for one.
    vocab_size: the model's; None reads it from the folder's config.json.
    """
    folder = Path(model_dir) if model_dir is not None and Path(model_dir).is_dir() else None
    recorded = _recorded_tokenizer(folder)
    if recorded == "bytes":
        return "bytes"
    if folder is not None and (folder / "tokenizer.json").is_file():
        return str(folder)
    if recorded:
        return recorded
    if vocab_size is None:
        vocab_size = _folder_vocab_size(model_dir)
    by_vocab = {BYTES_VOCAB: "bytes", GPT2_VOCAB: "gpt2"}.get(vocab_size)
    if by_vocab is None:
        raise ValueError(
            f"no default tokenizer for a model of {vocab_size} ids (257 would be bytes, 50257 GPT-2's, and its "
            "folder holds no tokenizer files): name one with --tokenizer"
        )
    return by_vocab


def _recorded_tokenizer(folder: Path | None) -> str | None:
    """The tokenizer a `hippos train` run directory's run.json records (None: no run, or not a text run)."""
    if folder is None or not (folder / "run.json").is_file():
        return None
    data = json.loads((folder / "run.json").read_text()).get("data")
    return data.get("tokenizer") if isinstance(data, dict) else None


def _folder_vocab_size(model_dir) -> int:
    """The vocabulary size in a save_pretrained folder's config.json."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: give a save_pretrained folder or run directory")
    return H3Config.load(config).vocab_size


def train_sections(config: str | None, out: str, resume: bool, overrides: list[str] = ()) -> dict:
    """The run's typed sections: from `config` (or, with resume alone, the run's own run.json) + overrides.

    A [data] table makes it a language-modeling run, a [task] table a synthetic one; the result is
    {"model": H3Config, "data": LMDataConfig or "task": SyntheticDataConfig, "train": TrainConfig}.
    """
    path = config
    if path is None:
        recorded = Path(out) / "run.json"
        if not (resume and recorded.is_file()):
            raise ValueError("give --config FILE (see configs/), or --resume with an --out directory holding run.json")
        path = recorded_tables(recorded)
    tables = path if isinstance(path, dict) else read_run_file(path)
    if "data" not in tables and "task" not in tables:
        raise ValueError(f"{path} has neither a [task] table (a synthetic task) nor a [data] table (text to learn); "
                         "see configs/ for examples")  # fmt: skip
    lm = "data" in tables
    second = {"data": LMDataConfig} if lm else {"task": SyntheticDataConfig}
    other = "task" if lm else "data"
    if any(flag.startswith(f"--{other}.") for flag in overrides[::2]):
        kind = "[data] table (text)" if lm else "[task] table (a synthetic task)"
        raise ValueError(f"--{other}.* options do not apply: {path} has a {kind}; its sections are model, "
                         f"{next(iter(second))}, train")  # fmt: skip
    # The model table is built once the data is known: its vocabulary comes from the data by default.
    run = load_run(path, {"model": H3Config, **second, "train": TrainConfig}, overrides, build={"model": dict})
    vocab = load_tokenizer(run["data"].tokenizer).vocab_size if lm else run["task"].spec().model_vocab_size
    run["model"] = H3Config.from_table(run["model"], vocab)
    return run


def recorded_tables(path) -> dict:
    """A run.json's model, data (or task) and train tables, as a run file would hold them (for --resume alone)."""
    with open(path) as f:
        record = json.load(f)
    model = {k: v for k, v in record["model"].items() if k != "model_type"}
    second = "task" if "task" in record["data"] else "data"  # a synthetic run records its task as "data"
    return {"model": model, second: record["data"], "train": record["train"]}


def check_run_dir(out: str | Path, resume: bool) -> None:
    """Refuse to start a fresh run over a finished or interrupted one (its files would be overwritten)."""
    if not resume and (Path(out) / "run.json").exists():
        raise ValueError(f"{out} already holds a run (run.json): pass --resume to continue it, or choose another --out")


def prepare_run(config: str | None, out: str, resume: bool, overrides: list[str] = ()) -> dict:
    """train_sections, checked against the run directory and (for text) the text's presence: every refusal
    comes before any work. Example data is fetched now."""
    run = train_sections(config, out, resume, overrides)
    check_run_dir(out, resume)
    if "data" in run:
        run["data"].check_sources()
    return run


def is_main_process() -> bool:
    """Whether this process prints: rank 0 under torchrun, always when alone."""
    return int(os.environ.get("RANK", "0")) == 0


def run_summary(run: dict, out: str) -> str:
    """One line saying what a run trains, on what, how long and where."""
    model, train = run["model"], run["train"]
    mixers = ", ".join(model.mixer(i) for i in range(model.n_layer))
    if "data" in run:
        data = run["data"]
        what = f"text ({', '.join(data.train)}; tokenizer {data.tokenizer}, L {data.seq_len})"
    else:
        spec = run["task"].spec()
        what = f"{spec.name} (V {spec.vocab_size}, L {spec.seq_len})"
    return (
        f"training {model.n_layer}-layer d_model {model.d_model} ({mixers}) on {what}: {train.steps} steps of "
        f"{train.batch_size}, lr {train.lr:g}, on {train.device} -> {out}"
    )


def train_run(run: dict, out: str, resume: bool = False, progress: bool = True) -> dict:
    """Train the run prepare_run built (text or synthetic task); returns the final metrics."""
    runner, data = (run_lm, run["data"]) if "data" in run else (run_synthetic, run["task"])
    return runner(run["model"], data, run["train"], out, resume=resume, progress=progress)


def synthetic_eval_data(model_dir: str, task: str | None = None, overrides=()) -> SyntheticDataConfig:
    """The task and data `hippos eval synthetic` scores a model on, checked before the model is loaded.

    task: a task name or a PAPER_TASKS preset; default: the task the model's run recorded, else
    associative_recall. overrides: `--task.field value` pairs over that task.
    """
    data = data_config_of_run(model_dir) if task is None else None
    if data is None:
        name = task or "associative_recall"
        data = SyntheticDataConfig.from_task(PAPER_TASKS[name]) if name in PAPER_TASKS else SyntheticDataConfig(name)
    return load_run(None, {"task": SyntheticDataConfig}, overrides, base={"task": data})["task"]


def synthetic_examples(config: H3Config, data: SyntheticDataConfig | None, examples: str | None = None):
    """(examples, a description of them) for a model of `config`: the test split of `data`, or an .npz file
    of examples (hippos.data.synthetic format) when `examples` names one."""
    if examples:
        return load_examples(examples), examples
    spec = data.spec()
    check_vocabulary(config, spec)
    what = f"{spec.name} (V {spec.vocab_size}, L {spec.seq_len}, pairs {spec.pairs}), test split of seed {data.seed}"
    return make_splits(spec, data.n_train, data.n_test, data.seed)[1], what
