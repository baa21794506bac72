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
    peak_tflops: float = 0.0  # the device's peak TFLOP/s for the MFU in the log (0: none; LM runs on a CPU measure it)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    parallel: str = "ddp"  # under torchrun: "ddp" (a replica per rank) or "fsdp" (weights and optimizer sharded)
    keep_freed_memory: bool = True  # CPU: reuse freed memory, not hand it back (faster; the process keeps its peak)

    POSITIVE: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "lr", "log_every")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
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
    return int((targets != -100).sum())


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

    evaluate(model) -> metrics ({"accuracy": ..., ...}) runs every cfg.eval_every steps and at the end.
    extra: JSON-ready facts about the run (task, data) written to run.json. progress: a progress bar (a string
    names it). flops_per_token: model FLOPs per trained token, for TFLOP/s (and MFU with cfg.peak_tflops) in
    the log. where: this process's rank when torchrun started several; batch_at then gives this rank's share
    of each global batch, rank 0 evaluates and writes every file. Returns the final metrics.
    """
    cfg.validate()
    where = where or Distributed()
    out = Path(out_dir)
    if where.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.keep_freed_memory and torch.device(cfg.device).type == "cpu":
        keep_freed_memory()  # see hippos.training.allocator: large tensors stop page-faulting every step
    model.to(cfg.device).train()
    model.gradient_checkpointing = cfg.activation_checkpointing
    par = Parallel(model, where, cfg.parallel)  # before the optimizer: FSDP replaces the parameters
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    factor = lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start, metrics = 0, {}
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        par.load_state_dicts(opt, ckpt["model"], ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start, metrics = ckpt["step"], ckpt.get("metrics", {})
    elif not resume:
        torch.manual_seed(cfg.seed)
    if where.is_main:
        record = {"train": asdict(cfg), "model": model.config.to_dict(), "world_size": where.world_size}
        (out / "run.json").write_text(json.dumps({**record, **(extra or {})}, indent=1))

    def checkpoint(step: int, rng: Tensor | None = None) -> None:
        model_state, opt_state = par.state_dicts(opt)  # every rank: under FSDP a gathering collective
        if not where.is_main:
            return
        state = {"model": model_state, "optimizer": opt_state, "scheduler": sched.state_dict()}
        rng = torch.get_rng_state() if rng is None else rng
        save_checkpoint(out, {**state, "rng": rng, "step": step, "metrics": metrics})

    bar = None
    if progress and where.is_main:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc=progress if isinstance(progress, str) else "train",
            unit="step",
            dynamic_ncols=True,
        )
    micro = cfg.micro_batch_size or cfg.batch_size
    step, tokens, clock = start, 0, time.perf_counter()
    step_rng = torch.get_rng_state()
    with open(out / "log.jsonl", "a") if where.is_main else contextlib.nullcontext() as log:
        try:
            while step < cfg.steps:
                step_rng = torch.get_rng_state()  # an interrupted step restarts from here
                inputs, targets = batch_at(step)
                inputs, targets = inputs.to(cfg.device), targets.to(cfg.device)
                total, loss_sum = max(1, _labelled(targets)), 0.0
                for i in range(0, inputs.shape[0], micro):
                    x, y = inputs[i : i + micro], targets[i : i + micro]
                    share = _labelled(y) / total
                    if share == 0:  # nothing to learn here (the mean over no tokens would be NaN)
                        if where.enabled:  # a rank that skipped would leave the others waiting in backward
                            raise ValueError(f"step {step}: a micro-batch without labels on rank {where.rank}")
                        continue
                    with par.sync(last=i + micro >= inputs.shape[0]), _autocast(cfg):
                        loss = par.loss(x, y)
                        # Each micro-batch's mean, weighted by its share of labelled tokens: the full-batch mean.
                        (loss * share).backward()
                    loss_sum += loss.item() * share
                if not where.enabled:  # (several ranks check the mean they share, at the next log line)
                    _check_finite(loss_sum, step, cfg)
                grad_norm = None
                if cfg.grad_clip:
                    grad_norm = par.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tokens += inputs.numel() * where.world_size
                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss_sum = all_sum(loss_sum, where) / where.world_size  # every rank's share of the batch
                    if where.enabled:  # one process checked every step above
                        _check_finite(loss_sum, step - 1, cfg)
                    rate = tokens / max(time.perf_counter() - clock, 1e-9)
                    record = {"step": step, "loss": loss_sum, "lr": opt.param_groups[0]["lr"],
                              "grad_norm": grad_norm, "tokens_per_s": rate}  # fmt: skip
                    if flops_per_token:
                        record["tflops"] = rate * flops_per_token / 1e12
                        if cfg.peak_tflops:
                            record["mfu"] = record["tflops"] / (cfg.peak_tflops * where.world_size)
                    if where.is_main:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    tokens, clock = 0, time.perf_counter()
                done = step == cfg.steps
                if evaluate is not None and (done or (cfg.eval_every and step % cfg.eval_every == 0)):
                    if where.is_main or par.sharded:  # sharded weights: every rank joins the evaluation
                        model.eval()
                        with torch.no_grad(), par.evaluating():
                            metrics = {k: float(v) for k, v in evaluate(model).items()}
                        model.train()
                    if where.is_main:
                        log.write(json.dumps({"step": step, "eval": metrics}) + "\n")
                        log.flush()
                    metrics = broadcast(metrics, where)  # every rank stops early together
                    reached = cfg.target_accuracy and metrics.get("accuracy", 0.0) >= cfg.target_accuracy
                    done = done or bool(reached)
                    clock = time.perf_counter()  # the evaluation's time is not training time
                if bar is not None:
                    bar.update(1)
                    shown = {"loss": f"{loss_sum:.3f}", **{f"eval_{k}": f"{v:.3f}" for k, v in metrics.items()}}
                    bar.set_postfix(shown, refresh=False)
                if done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    checkpoint(step)
                if done:
                    break
        except KeyboardInterrupt:
            checkpoint(step, step_rng)  # every completed step is kept; resume redoes the interrupted one
            raise
        finally:
            if bar is not None:
                bar.close()
    model.eval()
    par.save_pretrained(out)
    return {"step": step, **metrics}
