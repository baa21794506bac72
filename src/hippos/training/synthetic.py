"""Training a language model on a synthetic in-context-learning task (docs/tasks.md).

A run is three typed sections: the model (H3Config, optionally from a preset), the task and its data
(SyntheticDataConfig) and the training (TrainConfig). The data is regenerated from its seed, so a run
directory needs no copy of it: run.json records the task, and `hippos eval synthetic --model DIR` rebuilds
the same test split from there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..config import check_numbers
from ..data.packing import EpochOrder
from ..data.synthetic import TASK_NAMES, Examples, SyntheticTask, make_splits
from ..evaluation.synthetic import evaluate_examples
from ..models import H3LM, H3Config
from .loop import TrainConfig, train

LOSS_ON = ("all", "graded")


@dataclass
class SyntheticDataConfig:
    """A synthetic task and its data (the paper: 5000 training and 500 test examples)."""

    task: str = "associative_recall"  # associative_recall, induction_head or mqar
    vocab_size: int = 10  # the task's V (paper: 10 associative recall, 20 induction head, 8192 MQAR)
    seq_len: int = 20  # the task's L (paper: 20 associative recall, 30 induction head; MQAR 64 to 256)
    num_pairs: int = 0  # mqar: key-value pairs (associative_recall: 0, which means seq_len // 2)
    num_queries: int = 0  # mqar: keys queried again (0: every pair)
    n_train: int = 5000  # training examples
    n_test: int = 500  # test examples, none of them a training sequence
    seed: int = 0  # seed of the data (the model's initialisation and data order use train.seed)
    loss_on: str = "all"  # "all" positions (the paper) or "graded" (only the answers)

    POSITIVE: ClassVar[tuple[str, ...]] = ("vocab_size", "seq_len", "n_train", "n_test")

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_NAMES)}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        self.spec()  # the task's own checks, now rather than after the model is built

    def spec(self) -> SyntheticTask:
        """The task as hippos.data.synthetic describes it."""
        queries = (self.num_queries or None) if self.task == "mqar" else None
        return SyntheticTask(self.task, self.vocab_size, self.seq_len, self.num_pairs, queries)

    @classmethod
    def from_task(cls, task: SyntheticTask, **fields) -> SyntheticDataConfig:
        """The data config of a SyntheticTask (PAPER_TASKS entries, say), other fields as given."""
        return cls(task.name, task.vocab_size, task.seq_len, task.num_pairs, task.num_queries or 0, **fields)


class EpochBatches:
    """batch_at(step) -> (inputs, targets) for the training loop: epochs of shuffled, full batches.

    The batches come from `EpochOrder`, the sampler packed text uses too.
    """

    def __init__(self, examples: Examples, batch_size: int, seed: int, loss_on: str = "all"):
        if batch_size > examples.num_examples:
            raise ValueError(f"batch_size {batch_size} exceeds the {examples.num_examples} training examples")
        self.examples, self.order = examples, EpochOrder(examples.num_examples, batch_size, seed)
        self.targets = examples.targets if loss_on == "all" else examples.graded_targets()
        self.steps_per_epoch = self.order.steps_per_epoch

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        index = self.order(step)
        return self.examples.inputs[index], self.targets[index]


def check_vocabulary(config: H3Config, task: SyntheticTask) -> None:
    """Refuse a model whose vocabulary cannot hold the task's ids."""
    if config.vocab_size < task.model_vocab_size:
        raise ValueError(
            f"model vocab_size {config.vocab_size} is smaller than the {task.model_vocab_size} ids of {task.name} "
            f"with vocab_size {task.vocab_size}"
        )


def run_synthetic(
    model_cfg: H3Config,
    data: SyntheticDataConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | str = True,
) -> dict:
    """Train a fresh model on a synthetic task, evaluating on its test split; returns the final metrics.

    out_dir gets log.jsonl, run.json (with the task), checkpoints and the trained model (from_pretrained).
    """
    task = data.spec()
    check_vocabulary(model_cfg, task)
    trainset, testset = make_splits(task, data.n_train, data.n_test, data.seed)
    batches = EpochBatches(trainset, train_cfg.batch_size, train_cfg.seed, data.loss_on)
    torch.manual_seed(train_cfg.seed)  # the initialisation; the loop reseeds for dropout and order
    model = H3LM(model_cfg)
    extra = {"data": asdict(data), "parameters": model.num_parameters(), "steps_per_epoch": batches.steps_per_epoch}
    evaluate = lambda m: evaluate_examples(m, testset.to(train_cfg.device), task.model_vocab_size)  # noqa: E731
    return train(model, batches, train_cfg, out_dir, evaluate, resume=resume, progress=progress, extra=extra)


def data_config_of_run(run_dir: str | Path) -> SyntheticDataConfig | None:
    """The SyntheticDataConfig recorded in a run directory's run.json, or None when there is none."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text()).get("data")
    if not isinstance(record, dict) or "task" not in record:
        return None
    known = {f.name for f in dataclasses.fields(SyntheticDataConfig)}
    return SyntheticDataConfig(**{k: v for k, v in record.items() if k in known})
