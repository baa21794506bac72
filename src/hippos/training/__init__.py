"""Training: the loop, optimiser groups, schedules and checkpoints."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import TrainConfig, train
from .optim import lr_factor, make_optimizer, param_groups

__all__ = [
    "TrainConfig",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "make_optimizer",
    "param_groups",
    "save_checkpoint",
    "train",
]
