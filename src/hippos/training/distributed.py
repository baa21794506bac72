"""Many processes through torchrun: process-group set-up, the DistributedDataParallel wrapper, collectives.

`torchrun --nproc_per_node N -m hippos train ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and a
rendezvous in the environment; `init_distributed` reads them (a plain `hippos train` is one process and needs
nothing). gloo serves CPUs and nccl GPUs, one GPU per local rank. Every rank trains a replica on its own share
of each global batch (hippos.data.packing); DDP averages the gradients, so N processes train the same model
as one process with the same global batch. Rank 0 alone writes logs, checkpoints and the final model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Distributed:
    """Where this process stands among the ranks (world_size 1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that writes files and shows progress."""
        return self.rank == 0


def init_distributed(device: str = "cpu") -> Distributed:
    """Join the process group torchrun described in the environment (or stay single); returns this rank.

    For CUDA devices the process takes the GPU of its local rank ("cuda" becomes "cuda:LOCAL_RANK").
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(rank, world_size, local_rank)


def rank_device(device: str, where: Distributed) -> str:
    """The device of this rank: its own GPU for "cuda", the given device otherwise."""
    return f"cuda:{where.local_rank}" if device == "cuda" and where.enabled else device


class LossOf(nn.Module):
    """model.loss(x, y) as a module's forward, so that DDP's hooks see the whole computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """(B, L) inputs and targets -> mean cross-entropy over targets != -100."""
        return self.model.loss(inputs, targets)


def loss_module(model: nn.Module, where: Distributed) -> nn.Module:
    """What the training loop calls for the loss: model.loss, wrapped in DDP when there are several ranks."""
    module = LossOf(model)
    if not where.enabled:
        return module
    device_ids = [where.local_rank] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def no_sync(module: nn.Module, last: bool):
    """Inside gradient accumulation: skip DDP's all-reduce for every micro-batch but the last."""
    if last or not isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def broadcast(value, where: Distributed):
    """Rank 0's value on every rank (a Python object: a decision such as early stopping)."""
    if not where.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: float, where: Distributed) -> float:
    """The sum of a number over the ranks."""
    if not where.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t)
