"""AdamW with the SSM parameter groups of REFERENCE 2, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Two groups: SSM parameters marked with `_optim` (no weight decay, lr capped at their lr_max, 1e-3) and
    everything else (AdamW weight decay). Each parameter appears once, even when tied."""
    ssm: dict[float, list] = {}
    rest = []
    for p in dict.fromkeys(model.parameters()):  # tied parameters once, in a stable order
        if not p.requires_grad:
            continue
        hint = getattr(p, "_optim", None)
        if hint is None:
            rest.append(p)
        else:
            ssm.setdefault(min(lr, hint.get("lr_max", lr)), []).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "default"}]
    for group_lr, params in sorted(ssm.items()):
        groups.append({"params": params, "lr": group_lr, "weight_decay": 0.0, "name": f"ssm (lr {group_lr:g})"})
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `param_groups`."""
    return torch.optim.AdamW(param_groups(model, lr, weight_decay), lr=lr, betas=betas)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1) -> float:
    """Multiplier of every group's base lr at `step`: linear warmup, then decay to min_ratio at `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
