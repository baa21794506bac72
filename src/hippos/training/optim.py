"""AdamW with the SSM parameter groups (docs/models.md), and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")

# SSM parameters (the ones a layer class names in `ssm_parameter_names`) train without weight decay and with a
# learning rate of at most this: the paper's recipe (docs/models.md), larger steps destabilise the state matrices.
SSM_LR_MAX = 1e-3


def ssm_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that modules of `model` name in their class's `ssm_parameter_names`.

    Read from the modules, not from marks on the tensors: FSDP and from_pretrained replace parameter objects,
    but every module keeps its parameters under the same names.
    """
    found = set()
    for module in model.modules():
        for name in getattr(type(module), "ssm_parameter_names", ()):
            param = module._parameters.get(name)
            if param is not None:
                found.add(id(param))
    return found


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Two groups: the SSM parameters (`ssm_parameter_names`: no weight decay, lr capped at SSM_LR_MAX) and
    everything else (AdamW weight decay). Each parameter appears once, even when tied."""
    ssm_ids = ssm_parameters(model)
    ssm, rest = [], []
    for p in dict.fromkeys(model.parameters()):  # tied parameters once, in a stable order
        if p.requires_grad:
            (ssm if id(p) in ssm_ids else rest).append(p)
    ssm_lr = min(lr, SSM_LR_MAX)
    groups = [
        {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "default"},
        {"params": ssm, "lr": ssm_lr, "weight_decay": 0.0, "name": f"ssm (lr {ssm_lr:g})"},
    ]
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
