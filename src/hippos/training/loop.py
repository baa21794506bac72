"""The training loop: AdamW with SSM groups, warmup + decay, clipping, accumulation, evaluation, checkpoints.

Data comes as a function `batch_at(step) -> (inputs, targets)` that depends on the step alone, so the data
position of a resumed run is just its step, and with the optimizer, schedule and RNG states restored an
interrupted run ends exactly where an uninterrupted one would (on the CPU, same seed).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..config import check_device_name, check_numbers
from ..models import H3LM
from .allocator import keep_freed_memory
from .checkpoint import latest_checkpoint, save_checkpoint
from .distributed import PARALLEL, Distributed, Parallel, all_sum, broadcast
from .optim import SCHEDULES, lr_factor, make_optimizer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 0  # sequences per forward/backward (0: the whole batch); gradients accumulate
    lr: float = 5e-4  # peak learning rate (SSM parameters: at most 1e-3)
    weight_decay: float = 0.1  # AdamW weight decay (SSM parameters: none)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    warmup_steps: int = 0  # linear warmup steps
    schedule: str = "cosine"  # decay after warmup: cosine, linear or constant
    min_lr_ratio: float = 0.1  # the decay ends at this fraction of the peak
    grad_clip: float = 1.0  # gradient-norm clipping (0: off)
    eval_every: int = 100  # steps between evaluations (0: only at the end)
    log_every: int = 10  # steps between log lines
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end)
    target_accuracy: float = 0.0  # stop once the evaluation accuracy reaches this (0: never)
    seed: int = 0  # seed of the model initialisation, data order and dropout
    device: str = "cpu"  # torch device
    precision: str = "auto"  # autocast: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16
    peak_tflops: float = 0.0  # peak TFLOP/s for the log's MFU (0: no MFU; `hippos train` on a CPU measures it)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    parallel: str = "ddp"  # under torchrun: "ddp" (a replica per rank) or "fsdp" (weights and optimizer sharded)
    keep_freed_memory: bool = True  # CPU: keep freed memory for reuse (125M steps 26-32% faster; RSS stays at its peak)

    POSITIVE: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "lr", "log_every")

    def __post_init__(self) -> None:
        """Refuse ill-typed, out-of-range or inconsistent settings (ValueError naming the field)."""
        check_numbers(self)
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}")
        for name in ("beta1", "beta2"):
            if getattr(self, name) >= 1:
                raise ValueError(f"{name} must be below 1, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "target_accuracy"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be at most 1, got {getattr(self, name)}")
        for name, value, choices in (
            ("schedule", self.schedule, SCHEDULES),
            ("parallel", self.parallel, PARALLEL),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        check_device_name(self.device)


def _autocast(cfg: TrainConfig):
    """The autocast context of cfg.precision ("auto": bf16 on CUDA, fp32 elsewhere)."""
    device = torch.device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _check_finite(loss: float, step: int, cfg: TrainConfig) -> None:
    """Stop a run whose loss is no longer a number: every further step would train on NaN and waste the time."""
    if not math.isfinite(loss):
        raise ValueError(
            f"training diverged at step {step + 1}: the loss is {loss} (lr {cfg.lr:g}); lower the learning rate "
            "or warm up longer; checkpoints written before stay as they were"
        )


def _labelled(targets: Tensor) -> int:
    """Number of positions with a target ((B, L) targets, -100 means none)."""
    return int((targets != -100).sum())


class _Throughput:
    """Tokens per second of training since the last reading (evaluations are left out by restarting)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        """Count from now."""
        self.tokens, self.clock = 0, time.perf_counter()

    def count(self, tokens: int) -> None:
        """Add the tokens of one step (every rank's)."""
        self.tokens += tokens

    def rate(self) -> float:
        """Tokens per second since the last restart."""
        return self.tokens / max(time.perf_counter() - self.clock, 1e-9)


class _Run:
    """The pieces of one training run (model, optimizer, schedule, log) and what is done with them per step."""

    def __init__(self, model: H3LM, cfg: TrainConfig, out: Path, where: Distributed, flops_per_token: float):
        self.model, self.cfg, self.out, self.where = model, cfg, out, where
        self.flops_per_token, self.metrics, self.log = flops_per_token, {}, None
        if where.is_main:
            out.mkdir(parents=True, exist_ok=True)
        if cfg.keep_freed_memory and torch.device(cfg.device).type == "cpu":
            keep_freed_memory()  # see hippos.training.allocator: large tensors stop page-faulting every step
        model.to(cfg.device).train()
        model.gradient_checkpointing = cfg.activation_checkpointing
        self.par = Parallel(model, where, cfg.parallel)  # before the optimizer: FSDP replaces the parameters
        self.opt = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        factor = lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    def restore(self, resume: bool) -> int:
        """Load the last complete checkpoint when resuming (else seed the run); returns the step to start at."""
        ckpt = latest_checkpoint(self.out) if resume else None
        if ckpt is None:
            if not resume:
                torch.manual_seed(self.cfg.seed)
            return 0
        self.par.load_state_dicts(self.opt, ckpt["model"], ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        self.metrics = ckpt.get("metrics", {})
        return ckpt["step"]

    def write_record(self, extra: dict | None) -> None:
        """run.json: the training settings, the model's config, the number of ranks and the caller's facts."""
        if self.where.is_main:
            record = {"train": asdict(self.cfg), "model": self.model.config.to_dict(),
                      "world_size": self.where.world_size}  # fmt: skip
            (self.out / "run.json").write_text(json.dumps({**record, **(extra or {})}, indent=1))

    def write_log(self, record: dict) -> None:
        """One line of log.jsonl (rank 0), flushed: a follower (hippos.benchmarks.runs) reads it live."""
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def step(self, inputs: Tensor, targets: Tensor, step: int) -> tuple[float, float | None]:
        """One optimizer step on this rank's (B, L) batch; returns (mean loss, gradient norm or None)."""
        cfg, par = self.cfg, self.par
        inputs, targets = inputs.to(cfg.device), targets.to(cfg.device)
        micro = cfg.micro_batch_size or cfg.batch_size
        total, loss_sum = max(1, _labelled(targets)), 0.0
        for i in range(0, inputs.shape[0], micro):
            x, y = inputs[i : i + micro], targets[i : i + micro]
            share = _labelled(y) / total
            if share == 0:  # nothing to learn here (the mean over no tokens would be NaN)
                if self.where.enabled:  # a rank that skipped would leave the others waiting in backward
                    raise ValueError(f"step {step}: a micro-batch without labels on rank {self.where.rank}")
                continue
            with par.sync(last=i + micro >= inputs.shape[0]), _autocast(cfg):
                loss = par.loss(x, y)
                # Each micro-batch's mean, weighted by its share of labelled tokens: the full-batch mean.
                (loss * share).backward()
            loss_sum += loss.item() * share
        if not self.where.enabled:  # (several ranks check the mean they share, at the next log line)
            _check_finite(loss_sum, step, cfg)
        return loss_sum, self._update()

    def _update(self) -> float | None:
        """Clip, step the optimizer and the schedule, clear the gradients; returns the norm when clipping."""
        grad_norm = None
        if self.cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            grad_norm = self.par.grad_norm_value(norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def log_step(self, step: int, loss: float, grad_norm: float | None, meter: _Throughput) -> float:
        """Write the log line of `step` (loss over every rank, lr, grad norm, throughput); returns that loss."""
        where = self.where
        loss = all_sum(loss, where) / where.world_size  # every rank's share of the batch
        if where.enabled:  # one process checked every step already
            _check_finite(loss, step - 1, self.cfg)
        rate = meter.rate()
        record = {"step": step, "loss": loss, "lr": self.opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                  "tokens_per_s": rate}  # fmt: skip
        if self.flops_per_token:
            record["tflops"] = rate * self.flops_per_token / 1e12
            if self.cfg.peak_tflops:
                record["mfu"] = record["tflops"] / (self.cfg.peak_tflops * where.world_size)
        self.write_log(record)
        meter.restart()
        return loss

    def evaluate(self, step: int, evaluate: Callable[[H3LM], dict]) -> bool:
        """Run evaluate(model) (on every rank when sharded), log it; True when the target accuracy is reached."""
        if self.where.is_main or self.par.sharded:  # sharded weights: every rank joins the evaluation
            self.model.eval()
            with torch.no_grad(), self.par.evaluating():
                self.metrics = {k: float(v) for k, v in evaluate(self.model).items()}
            self.model.train()
        self.write_log({"step": step, "eval": self.metrics})
        self.metrics = broadcast(self.metrics, self.where)  # every rank stops early together
        target = self.cfg.target_accuracy
        return bool(target and self.metrics.get("accuracy", 0.0) >= target)

    def checkpoint(self, step: int, rng: Tensor | None = None) -> None:
        """Save model, optimizer, schedule, RNG and metrics after `step` (rng: the state to resume with)."""
        model_state, opt_state = self.par.state_dicts(self.opt)  # every rank: under FSDP a gathering collective
        if not self.where.is_main:
            return
        state = {"model": model_state, "optimizer": opt_state, "scheduler": self.sched.state_dict()}
        rng = torch.get_rng_state() if rng is None else rng
        save_checkpoint(self.out, {**state, "rng": rng, "step": step, "metrics": self.metrics})

    @contextlib.contextmanager
    def logging(self, progress: bool | str, start: int):
        """Open log.jsonl for appending (rank 0) and a progress bar; yields the bar or None."""
        with open(self.out / "log.jsonl", "a") if self.where.is_main else contextlib.nullcontext() as log:
            self.log, bar = log, None
            if progress and self.where.is_main:
                from tqdm import tqdm

                desc = progress if isinstance(progress, str) else "train"
                bar = tqdm(total=self.cfg.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
            try:
                yield bar
            finally:
                if bar is not None:
                    bar.close()
                self.log = None


def train(
    model: H3LM,
    batch_at: Callable[[int], tuple[Tensor, Tensor]],
    cfg: TrainConfig,
    out_dir: str | Path,
    evaluate: Callable[[H3LM], dict] | None = None,
    resume: bool = False,
    progress: bool | str = True,
    extra: dict | None = None,
    flops_per_token: float = 0.0,
    where: Distributed | None = None,
) -> dict:
    """Train `model` in place; write log.jsonl, checkpoints and the final model (save_pretrained) to out_dir.

    batch_at(step) -> (inputs, targets), each (B, L) int64. evaluate(model) -> metrics ({"accuracy": ..., ...})
    runs every cfg.eval_every steps and at the end. extra: JSON-ready facts about the run (task, data) written
    to run.json. progress: a progress bar (a string names it). flops_per_token: model FLOPs per trained token,
    for TFLOP/s (and MFU with cfg.peak_tflops) in the log. where: this process's rank when torchrun started
    several; batch_at then gives this rank's share of each global batch, rank 0 evaluates and writes every file.
    Returns the final metrics and the step reached.
    """
    run = _Run(model, cfg, Path(out_dir), where or Distributed(), flops_per_token)
    start = run.restore(resume)
    run.write_record(extra)
    with run.logging(progress, start) as bar:
        step = _loop(run, batch_at, evaluate, start, bar)
    model.eval()
    run.par.save_pretrained(run.out)
    return {"step": step, **run.metrics}


def _loop(run: _Run, batch_at, evaluate, step: int, bar) -> int:
    """Step, log, evaluate, checkpoint until cfg.steps or the target accuracy; returns the last step done.

    Ctrl-C saves every completed step: the checkpoint takes the RNG state from before the interrupted step,
    which a resumed run then redoes exactly.
    """
    cfg, meter, loss = run.cfg, _Throughput(), 0.0
    step_rng = torch.get_rng_state()
    try:
        while step < cfg.steps:
            step_rng = torch.get_rng_state()  # an interrupted step restarts from here
            inputs, targets = batch_at(step)
            loss, grad_norm = run.step(inputs, targets, step)
            step += 1
            meter.count(inputs.numel() * run.where.world_size)
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = run.log_step(step, loss, grad_norm, meter)
            done = step == cfg.steps
            if evaluate is not None and (done or (cfg.eval_every and step % cfg.eval_every == 0)):
                done = run.evaluate(step, evaluate) or done
                meter.restart()  # the evaluation's time is not training time
            _show(bar, loss, run.metrics)
            if done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                run.checkpoint(step)
            if done:
                return step
    except KeyboardInterrupt:
        run.checkpoint(step, step_rng)
        raise
    return step


def _show(bar, loss: float, metrics: dict) -> None:
    """Advance the progress bar by one step, showing the loss and the last evaluation."""
    if bar is not None:
        bar.update(1)
        shown = {"loss": f"{loss:.3f}", **{f"eval_{k}": f"{v:.3f}" for k, v in metrics.items()}}
        bar.set_postfix(shown, refresh=False)
