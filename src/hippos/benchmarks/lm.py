"""The paper's language-modeling comparison at small scale: Transformer, H3, hybrid and S4D on real text.

Every (dataset, model) is one `run_lm` run: byte-level tokens, the first 90% of the file for training and the
last 10% for validation, the same recipe, the same number of training tokens, and parameter counts matched
within a few percent by the number of layers (an S4D layer has fewer weights than an H3 or attention layer).
The paper's ordering (OpenWebText, 125M: hybrid 19.6 < Transformer 20.6 < H3 21.0 << S4D 24.9 perplexity)
is what the table is compared with. Runs train side by side in worker processes, are reused when finished
with the same settings and resume when interrupted (hippos.benchmarks.runs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

from ..config import check_choices, check_numbers
from ..data.text import check_source_spec, find_sources
from ..models import H3Config
from ..training import TrainConfig
from ..training.lm import LMDataConfig, run_lm
from .measure import format_cells, machine_info
from .runs import read_log, run_all, settings_of

# Each dataset is a data source; the example: files are downloaded on first use (hippos.data.examples).
DATASETS = {"wikitext2": "example:wikitext2-valid", "tinyshakespeare": "example:tinyshakespeare"}

# Rows of the table: layers chosen so that every model has about 7.0M parameters at d_model 256 (bytes).
ARCHITECTURES = {
    "transformer": {"n_layer": 9, "attention": "all"},
    "H3": {"n_layer": 8},
    "hybrid": {"n_layer": 8, "attention": (2, 5)},  # two attention layers, at a third and two thirds of the depth
    "S4D": {"n_layer": 11, "ssm_mixer": "s4d"},
}

# OpenWebText perplexity of the 125M models, as the H3 paper reports them (docs/tasks.md).
PAPER_PPL = {"hybrid": 19.6, "transformer": 20.6, "H3": 21.0, "S4D": 24.9}


@dataclass
class LMBenchConfig:
    """Which runs make the comparison, and the one recipe they all train with."""

    datasets: tuple[str, ...] = ("wikitext2", "tinyshakespeare")  # wikitext2 (its validation split), tinyshakespeare
    models: tuple[str, ...] = ("transformer", "H3", "hybrid", "S4D")  # rows: transformer, H3, hybrid, S4D
    d_model: int = 256  # model width
    n_head: int = 4  # attention heads (rotary on the whole head)
    d_state: int = 64  # SSM state size
    seq_len: int = 256  # bytes per training sequence
    batch_size: int = 16  # sequences per step
    steps: int = 200  # optimizer steps: every model sees steps * batch_size * seq_len training tokens
    lr: float = 2e-3  # peak learning rate (SSM parameters: at most 1e-3)
    warmup_steps: int = 20  # linear warmup steps, then cosine decay
    eval_every: int = 40  # steps between validation evaluations
    eval_tokens: int = 32768  # validation bytes scored at each evaluation (0: all)
    seed: int = 0  # initialisation and data order
    jobs: int = 2  # runs trained side by side in worker processes
    out: str = "runs/lm"  # directory of the runs (reused: finished runs are not retrained)

    POSITIVE: ClassVar[tuple[str, ...]] = ("d_model", "n_head", "d_state", "seq_len", "batch_size", "steps", "lr",
                                           "jobs")  # fmt: skip

    def __post_init__(self) -> None:
        """Refuse unknown datasets and models and bad settings before any training; nothing is downloaded here."""
        check_numbers(self)
        check_choices("datasets", self.datasets, DATASETS)
        check_choices("models", self.models, ARCHITECTURES)
        for name in self.datasets:
            check_source_spec(DATASETS[name])  # the spec only: validating must not wait on the network
        for job in self.runs():
            job_configs(self, **job)

    def runs(self) -> list[dict]:
        """Every run: {"dataset", "model"}."""
        return [{"dataset": d, "model": m} for d in self.datasets for m in self.models]


def job_configs(cfg: LMBenchConfig, dataset: str, model: str) -> tuple[H3Config, LMDataConfig, TrainConfig]:
    """(H3Config, LMDataConfig, TrainConfig) of one run."""
    arch = dict(ARCHITECTURES[model])
    attention = arch.pop("attention", ())
    n_layer = arch.pop("n_layer")
    attn_layer_idx = tuple(range(n_layer)) if attention == "all" else tuple(attention)
    model_cfg = H3Config(
        d_model=cfg.d_model,
        n_layer=n_layer,
        n_head=cfg.n_head,
        d_state=cfg.d_state,
        vocab_size=257,
        attn_layer_idx=attn_layer_idx,
        rotary_dim=cfg.d_model // cfg.n_head if attn_layer_idx else 0,
        **arch,
    )
    data = LMDataConfig(
        train=(DATASETS[dataset],),
        valid_fraction=0.1,
        tokenizer="bytes",
        seq_len=cfg.seq_len,
        eval_tokens=cfg.eval_tokens,
    )
    train = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        eval_every=cfg.eval_every,
        log_every=10,
        checkpoint_every=100,
        seed=cfg.seed,
    )
    return model_cfg, data, train


def run_dir(cfg: LMBenchConfig, job: dict) -> Path:
    """Directory of one run."""
    return Path(cfg.out) / f"{job['dataset']}-{job['model']}-d{cfg.d_model}-s{cfg.seed}"


def _train_one(cfg: LMBenchConfig, configs: dict[tuple[str, str], tuple], job: dict) -> dict:
    """Worker: train one run with the parent's configs (resuming it if interrupted); returns its result fields."""
    model_cfg, data, train = configs[job["dataset"], job["model"]]
    out = run_dir(cfg, job)
    metrics = run_lm(model_cfg, data, train, out, resume=True, progress=False)
    log = read_log(out)
    record = json.loads((out / "run.json").read_text())
    rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]  # the first interval includes start-up
    return {
        "perplexity": metrics["perplexity"],
        "bits_per_byte": metrics["bits_per_byte"],
        "valid_loss": metrics["loss"],
        "parameters": record["parameters"],
        "train_tokens": metrics["step"] * cfg.batch_size * cfg.seq_len,
        "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
        "curve": [(r["step"], r["eval"]["loss"]) for r in log if "eval" in r],
        "train_curve": [(r["step"], r["loss"]) for r in log if "loss" in r],
    }


def _label(job: dict, records: list[dict]) -> str:
    evals = [r["eval"]["perplexity"] for r in records if "eval" in r]
    return f"{job['dataset']}/{job['model']}" + (f" ppl {evals[-1]:.2f}" if evals else "")


def run_lm_bench(cfg: LMBenchConfig, progress: bool = True) -> dict:
    """Train every run (reusing finished ones); returns {"config", "runs", "ordering", "machine", ...}."""
    # The text is fetched here, once, before any worker starts: one download per file, not one per worker, and
    # an offline machine gets one clear error before any work.
    find_sources([DATASETS[d] for d in cfg.datasets], progress=progress)
    # The workers train with the configs made here, exactly those recorded as each run's settings.
    configs = {(job["dataset"], job["model"]): job_configs(cfg, **job) for job in cfg.runs()}
    runs, reused, wall = run_all(
        cfg.runs(),
        partial(_train_one, cfg, configs),
        run_dir=partial(run_dir, cfg),
        settings=lambda job: settings_of(*configs[job["dataset"], job["model"]]),
        workers=cfg.jobs,
        steps=cfg.steps,
        desc="language models",
        label=_label,
        progress=progress,
    )
    result = {"config": asdict(cfg), "runs": runs, "reused": reused, "wall_seconds": wall, "machine": machine_info()}
    result["ordering"] = {d: paper_ordering_holds(result, d) for d in cfg.datasets}
    return result


def paper_ordering_holds(result: dict, dataset: str) -> bool | None:
    """hybrid <= transformer < H3 < S4D in validation perplexity on this dataset (None: a model is missing)."""
    ppl = {r["model"]: r["perplexity"] for r in result["runs"] if r["dataset"] == dataset}
    if not set(PAPER_PPL) <= set(ppl):
        return None
    return ppl["hybrid"] <= ppl["transformer"] < ppl["H3"] < ppl["S4D"]


def format_table(result: dict, markdown: bool = False) -> str:
    """Validation perplexity (bits per byte) per model and dataset, beside the paper's ordering."""
    cfg = result["config"]
    header = ["model", "params"] + [f"{d} ppl (bpb)" for d in cfg["datasets"]] + ["tokens/s", "paper OWT ppl"]
    cells = [header]
    for model in cfg["models"]:
        runs = {r["dataset"]: r for r in result["runs"] if r["model"] == model}
        first = next(iter(runs.values()))
        row = [model, f"{first['parameters']:,}"]
        row += [f"{runs[d]['perplexity']:.3f} ({runs[d]['bits_per_byte']:.3f})" for d in cfg["datasets"]]
        rates = [r["tokens_per_s"] for r in runs.values() if r["tokens_per_s"]]
        row += [f"{sum(rates) / len(rates):,.0f}" if rates else "-", f"{PAPER_PPL.get(model, '-')}"]
        cells.append(row)
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    order = ", ".join(f"{d}: {'holds' if ok else 'does not hold' if ok is not None else 'n/a'}"
                      for d, ok in result["ordering"].items())  # fmt: skip
    note = (f"byte-level, {tokens:,} training tokens per run (seq {cfg['seq_len']}, batch {cfg['batch_size']}), "
            f"validation on the last 10% of each file; paper ordering hybrid <= transformer < H3 < S4D: "
            f"{order}")  # fmt: skip
    return "\n".join(format_cells(cells, markdown)) + "\n" + note


def plot(result: dict, path: str) -> None:
    """Validation loss (nats per byte) against training step, one panel per dataset, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = result["config"]["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    colors = dict(zip(ARCHITECTURES, ("tab:green", "tab:blue", "tab:purple", "tab:red")))
    for ax, dataset in zip(axes[0], datasets):
        for run in result["runs"]:
            if run["dataset"] == dataset and run["curve"]:
                steps, losses = zip(*run["curve"])
                ax.plot(steps, losses, "o-", color=colors[run["model"]], label=run["model"], markersize=3)
                steps, losses = zip(*run["train_curve"])
                ax.plot(steps, losses, ":", color=colors[run["model"]], alpha=0.5)
        ax.set_title(f"{dataset} (solid: validation, dotted: training)")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (nats per byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
