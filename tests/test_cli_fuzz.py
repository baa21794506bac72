"""Every subcommand meets malformed input with one line on stderr, a non-zero exit, no traceback, and no file
of the user's changed (property-based: hypothesis picks the subcommand, the option and the bad value).

Each subcommand starts from a valid command line in a folder of small, real files; one option of it is then
given a malformed value: a wrong type, a negative, zero where a count must be positive, an int beyond 64 bits,
a non-finite float, a missing, empty, binary or truncated file, a folder where a file belongs (or the other
way round), an unknown key. Nothing must be printed on stdout either: every check runs before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hippos import H3LM, H3Config
from hippos.benchmarks.generate import GenerateBenchConfig
from hippos.benchmarks.layer import LayerBenchConfig
from hippos.benchmarks.lm import LMBenchConfig
from hippos.benchmarks.serve import ServeBenchConfig
from hippos.benchmarks.synthetic import SyntheticBenchConfig
from hippos.benchmarks.train_speed import TrainBenchConfig
from hippos.cli import main
from hippos.training import TrainConfig
from hippos.training.lm import LMDataConfig
from hippos.training.synthetic import SyntheticDataConfig

# ---- the user's folder ---------------------------------------------------------------------------------------
SYNTHETIC_RUN = """[model]
d_model = 16
n_layer = 2
d_state = 8
n_head = 2
attn_layer_idx = [1]

[task]
task = "associative_recall"
n_train = 64
n_test = 16

[train]
steps = 2
batch_size = 8
"""
LM_RUN = """[model]
d_model = 16
n_layer = 2
d_state = 8

[data]
train = ["text.txt"]
seq_len = 16

[train]
steps = 2
batch_size = 4
"""


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """A folder as a user has it: a model, run files, text, examples, and damaged or foreign files."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    model = H3LM(H3Config.preset("tiny", d_model=16, n_head=2, d_state=8))
    model.save_pretrained(root / "model")
    torch.save(H3LM(H3Config.preset("tiny", attn_layer_idx=(0, 1))).state_dict(), root / "official.pt")
    (root / "run.toml").write_text(SYNTHETIC_RUN)
    (root / "lm.toml").write_text(LM_RUN)
    (root / "text.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    grid = np.zeros((4, 8), dtype=np.int64)
    np.savez(root / "examples.npz", inputs=grid, targets=grid, graded=grid.astype(bool))
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)  # NUL bytes and invalid UTF-8
    (root / "truncated.toml").write_text(SYNTHETIC_RUN[: len(SYNTHETIC_RUN) // 3] + "[tra")
    (root / "truncated.pt").write_bytes((root / "official.pt").read_bytes()[:300])
    (root / "truncated.npz").write_bytes((root / "examples.npz").read_bytes()[:200])
    (root / "folder").mkdir()
    (root / "damaged").mkdir()
    (root / "damaged" / "config.json").write_text((root / "model" / "config.json").read_text())
    (root / "damaged" / "model.safetensors").write_bytes((root / "model" / "model.safetensors").read_bytes()[:100])
    return root


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder below root: size and content hash (folders: -1)."""
    seen = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        seen[key] = (-1, "") if path.is_dir() else (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


# ---- malformed values ----------------------------------------------------------------------------------------
NOT_INTEGER_WORDS = ["abc", "1.5", "1e3", "0x10", "--", "nan", "true", "½"]
NOT_INTEGERS = st.sampled_from(["", *NOT_INTEGER_WORDS])  # (in a list, "" is no entry at all: no error)
NOT_NUMBERS = st.sampled_from(["abc", "", "nan", "inf", "-inf", "1e999", "-1e999", "NaN", "1,5", "two"])
BEYOND_64_BITS = st.integers(min_value=2**63, max_value=2**70).map(str)


def bad_ints(low: int, in_list: bool = False) -> st.SearchStrategy[str]:
    """Text that is no integer, or one below `low`, or beyond 64 bits (in_list: one entry of a list)."""
    words = st.sampled_from(NOT_INTEGER_WORDS) if in_list else NOT_INTEGERS
    return st.one_of(words, st.integers(max_value=low - 1, min_value=low - 10**6).map(str), BEYOND_64_BITS)


def bad_floats(low: float, above: bool) -> st.SearchStrategy[str]:
    """Text that is no finite number, or a number below `low` (or equal to it, when it must lie above)."""
    below = st.floats(max_value=low, min_value=low - 1e6, exclude_max=not above, allow_nan=False)
    return st.one_of(NOT_NUMBERS, below.map(repr))


def bad_names() -> st.SearchStrategy[str]:
    """A name that no enumerated field accepts (alone, or in a comma-separated list)."""
    word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).map(lambda w: f"zz{w}")
    return st.one_of(word, word.map(lambda w: f"{w},{w}"))


INPUT_FILES = ("missing.txt", "missing/inside.txt", "empty.txt", "binary.bin", "folder")
# For options that name a file to read: (bad files); each is a path below the user's folder.
FILE_KINDS = {
    "config": (*INPUT_FILES, "truncated.toml"),
    # A benchmark's --config: an empty file is a valid one (all defaults: the benchmark would run); a run file's
    # [model], [task] and [train] tables are no [bench] table.
    "bench-config": ("missing.txt", "binary.bin", "folder", "truncated.toml", "run.toml"),
    "model": ("missing-model", "runs/demo/typo", "empty.txt", "binary.bin", "folder", "damaged", "truncated.pt"),
    "text": INPUT_FILES,
    "examples": (*INPUT_FILES, "truncated.npz"),
    "pt": (*INPUT_FILES, "truncated.pt"),
}
OUTPUT_FILE = st.sampled_from(["folder", "missing/out.json", "model"])  # a folder, or a file in a missing folder
OUTPUT_DIR = st.sampled_from(["text.txt", "text.txt/out"])  # a file, or a path through one


# Text fields that take one of a few names (free-form ones, like tokenizer names or paths, are not fuzzed).
ENUMS = {"ssm_mixer", "ssm_init", "discretization", "ssm_mode", "schedule", "precision", "parallel", "device",
         "task", "tasks", "loss_on", "impls", "models", "preset", "datasets", "quantize"}  # fmt: skip


def field_options(cls: type, section: str, skip: tuple[str, ...] = ()) -> list[tuple[str, st.SearchStrategy[str]]]:
    """(--section.field, bad values) for every numeric or enumerated field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, in_list = hints[f.name], typing.get_origin(hints[f.name]) is tuple
        kind = typing.get_args(kind)[0] if in_list else kind
        flag = f"--{section}.{f.name}"
        positive = f.name in getattr(cls, "POSITIVE", ())
        if kind is int:
            low = 1 if positive else getattr(cls, "MINIMUM", {}).get(f.name, 0)
            options.append((flag, bad_ints(low, in_list)))
        elif kind is float:
            options.append((flag, bad_floats(0.0, above=positive)))
        elif kind is bool:
            options.append((flag, st.sampled_from(["maybe", "2", "", "yes please"])))
        elif f.name in ENUMS:
            options.append((flag, bad_names()))
    return options


UNKNOWN_FLAGS = st.sampled_from(
    ["--frobnicate", "--train.bogus", "--model.d_modle", "--nosuch.field", "--d-modle", "--bench.d_modle"]
)


def files(kind: str) -> st.SearchStrategy[str]:
    return st.sampled_from(FILE_KINDS[kind])


# (base command line, [(option, bad values)]); file values are relative to the user's folder.
# The benchmarks by subcommand name: each takes --json, --config and --bench.FIELD for every field of its config.
BENCHES = {"layer": LayerBenchConfig, "generate": GenerateBenchConfig, "train": TrainBenchConfig,
           "synthetic": SyntheticBenchConfig, "lm": LMBenchConfig, "serve": ServeBenchConfig}  # fmt: skip
COMMANDS = {
    "demo": (["demo", "--out", "demo-runs"], [("--out", OUTPUT_DIR), ("--json", OUTPUT_FILE), ("--plot", OUTPUT_FILE)]),
    "generate": (
        ["generate", "--model", "model", "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"],
        [("--model", files("model")), ("--max-new-tokens", bad_ints(1)), ("--temperature", bad_floats(0.0, False)),
         ("--top-k", bad_ints(1)), ("--top-p", st.one_of(bad_floats(0.0, True), st.sampled_from(["1.5", "2"]))),
         ("--seed", bad_ints(0)), ("--n-head", bad_ints(1)), ("--prompt", st.just(""))],
    ),
    "convert": (["convert", "official.pt", "converted", "--n-head", "4"], [("SRC", files("pt")), ("DEST", OUTPUT_DIR),
                                                                          ("--n-head", bad_ints(1))]),
    "train": (
        ["train", "--config", "run.toml", "--out", "run-out", "--quiet"],
        [("--config", files("config")), ("--out", OUTPUT_DIR), ("--model.preset", bad_names()),
         *field_options(H3Config, "model"), *field_options(SyntheticDataConfig, "task"),
         *field_options(TrainConfig, "train")],
    ),
    "train-lm": (
        ["train", "--config", "lm.toml", "--out", "lm-out", "--quiet"],
        [("--data.train", files("text")), *field_options(LMDataConfig, "data")],
    ),
    "eval-synthetic": (
        ["eval", "synthetic", "--model", "model", "--task", "associative_recall"],
        [("--model", files("model")), ("--examples", files("examples")), ("--json", OUTPUT_FILE),
         ("--task", bad_names()), *field_options(SyntheticDataConfig, "task", skip=("task",))],
    ),
    "eval-ppl": (
        ["eval", "ppl", "--model", "model", "--data", "text.txt", "--context", "8", "--quiet"],
        [("--model", files("model")), ("--data", files("text")), ("--context", bad_ints(2)), ("--stride", bad_ints(1)),
         ("--batch-size", bad_ints(1)), ("--json", OUTPUT_FILE), ("--cache-dir", OUTPUT_DIR),
         ("--device", st.sampled_from(["gpu", "cuda", "cuda:7", "tpu:0", ""]))],
    ),
    "eval-harness": (
        ["eval", "harness", "--model", "model", "--tasks", "none"],
        [("--limit", bad_ints(1)), ("--batch-size", bad_ints(1)), ("--json", OUTPUT_FILE)],
    ),
    "tokenizer-train": (
        ["tokenizer", "train", "--data", "text.txt", "--vocab-size", "300", "--out", "tok", "--quiet"],
        [("--data", files("text")), ("--vocab-size", bad_ints(258)), ("--min-frequency", bad_ints(1)),
         ("--out", OUTPUT_DIR)],
    ),
    **{
        f"bench-{name}": (["bench", name], [("--json", OUTPUT_FILE), ("--config", files("bench-config")),
                                            *field_options(cls, "bench")])
        for name, cls in BENCHES.items()
    },
}  # fmt: skip
POSITIONAL = {"SRC": 1, "DEST": 2}  # convert's positional arguments, by index in its command line


def with_value(base: list[str], option: str, value: str, root: Path) -> list[str]:
    """The command line with `option` set to `value` (files resolved below root)."""
    argv = list(base)
    if option in POSITIONAL:
        argv[POSITIONAL[option]] = str(root / value)
        return argv
    if value in {*sum(FILE_KINDS.values(), ()), "text.txt", "text.txt/out", "model", "missing/out.json"}:
        value = str(root / value)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `hippos ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own exit on a bad option
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def assert_refused(argv: list[str], root: Path) -> str:
    """Run argv in root; require the clean refusal described in the module docstring. Returns the message."""
    before = snapshot(root)
    with contextlib.chdir(root):
        code, out, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    shown = f"hippos {' '.join(argv)}\nexit {code}\nstdout: {out!r}\nstderr: {err!r}"
    assert code not in (0, None), f"accepted:\n{shown}"
    assert len(lines) == 1 and "error" in lines[0], f"not one line of error:\n{shown}"
    assert "Traceback" not in err + out and out == "", f"printed more than the error:\n{shown}"
    assert snapshot(root) == before, f"the user's files changed:\n{shown}"
    return lines[0]


CASES = [(name, option) for name, (_, options) in sorted(COMMANDS.items()) for option, _ in options]


@pytest.mark.slow  # about 600 cases; test_cli.py covers the error path in the fast run
@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{n}:{o}" for n, o in CASES])
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_malformed_value_is_refused_cleanly(user_dir, name, option, data):
    """Every option of every subcommand, each with a few malformed values."""
    base, options = COMMANDS[name]
    values = dict(options)[option]
    assert_refused(with_value(base, option, data.draw(values, label="value"), user_dir), user_dir)


@pytest.mark.parametrize("name", sorted(COMMANDS))
@given(flag=UNKNOWN_FLAGS)
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_an_unknown_option_is_refused_cleanly(user_dir, name, flag):
    assert_refused([*COMMANDS[name][0], flag, "1"], user_dir)


# ---- the cases that were found by hand, kept as plain examples -----------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--config", "run.toml", "--out", "o", "--train.log_every", "0"], "log_every must be > 0"),
        (["train", "--config", "run.toml", "--out", "o", "--train.lr", "inf"], "lr must be a finite number"),
        (["train", "--config", "empty.txt", "--out", "o"], "neither a [task] table"),
        (["generate", "--model", "runs/demo/typo", "--prompt", "x"], "runs/demo/typo: no such file or directory"),
        (["eval", "ppl", "--model", "small-vocab", "--data", "text.txt"], "no default tokenizer for a model of 11 ids"),
        (["eval", "ppl", "--model", "model", "--data", "binary.bin"], "binary file"),
        (["train", "--config", "lm.toml", "--out", "o", "--data.train", "empty.txt"], "data.train is empty"),
    ],
)
def test_the_reported_cases(user_dir, argv, message):
    if "small-vocab" in argv and not (user_dir / "small-vocab").exists():
        H3LM(H3Config.preset("tiny", vocab_size=11, d_model=16, n_head=2, d_state=8)).save_pretrained(
            user_dir / "small-vocab"
        )
    assert message in assert_refused(argv, user_dir)


def test_a_run_directory_is_not_overwritten_without_resume(user_dir):
    (user_dir / "old-run").mkdir(exist_ok=True)
    (user_dir / "old-run" / "run.json").write_text("{}")
    message = assert_refused(["train", "--config", "run.toml", "--out", str(user_dir / "old-run")], user_dir)
    assert "already holds a run" in message and "--resume" in message


CHEAP = ("generate", "convert", "train", "train-lm", "eval-synthetic", "eval-ppl", "tokenizer-train")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_fuzzed_commands_are_valid_as_given(user_dir, tmp_path, name):
    """The base command lines pass every check (the quick ones run to the end): a refusal above is the doing of
    the malformed value, not of a broken base."""
    from hippos.cli import build_parser
    from hippos.config import load_run, section_overrides

    base = COMMANDS[name][0]
    work = tmp_path / "user"
    shutil.copytree(user_dir, work)
    argv = [str(work / a) if (work / a).exists() else a for a in base]
    if name in CHEAP:
        with contextlib.chdir(work):
            code, out, err = run_cli(argv)
        assert code == 0, f"{name}: {err}"
        return
    args, extra = build_parser().parse_known_args(argv)
    assert extra == [], name
    if name.startswith("bench-"):
        load_run(None, {"bench": BENCHES[name.removeprefix("bench-")]}, section_overrides(args))
