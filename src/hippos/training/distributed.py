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


PARALLEL = ("ddp", "fsdp")


class LossOf(nn.Module):
    """model.loss(x, y) as a module's forward, so that DDP's hooks see the whole computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """(B, L) inputs and targets -> mean cross-entropy over targets != -100."""
        return self.model.loss(inputs, targets)


class Parallel:
    """How the training loop reaches a model on one rank or many: the loss, gradient sync, state, saving.

    "ddp": a full replica per rank, gradients averaged (DistributedDataParallel). "fsdp": parameters, gradients
    and optimizer state sharded across the ranks (FSDP2 `fully_shard`, one unit per block plus the rest), for
    models that do not fit one device; every rank then takes part in evaluation and in gathering full state.
    One process: the model itself.
    """

    def __init__(self, model: nn.Module, where: Distributed, kind: str = "ddp"):
        if kind not in PARALLEL:
            raise ValueError(f"unknown parallel mode {kind!r}; choose one of {PARALLEL}")
        self.model, self.where = model, where
        self.kind = kind if where.enabled else "single"
        self._ddp = None
        if self.kind == "ddp":
            ids = [where.local_rank] if next(model.parameters()).is_cuda else None
            self._ddp = nn.parallel.DistributedDataParallel(LossOf(model), device_ids=ids)
        elif self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # fully_shard replaces every Parameter with a sharded one under the same module and name, which is
            # where the optimiser groups are read from (hippos.training.optim.ssm_parameters).
            for block in model.backbone.layers:
                fully_shard(block)
            fully_shard(model)  # the root: embedding (tied with the head) and final norm

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded (every rank must join evaluation and state gathering)."""
        return self.kind == "fsdp"

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of this rank's micro-batch."""
        if self._ddp is not None:
            return self._ddp(inputs, targets)
        if self.sharded:  # through forward, where FSDP's hooks gather the root's parameters
            return self.model(inputs, labels=targets).loss
        return self.model.loss(inputs, targets)  # the head only where a label is: cheap for sparse tasks

    def sync(self, last: bool):
        """Inside gradient accumulation: reduce gradients across ranks only after the last micro-batch."""
        if self._ddp is not None and not last:
            return self._ddp.no_sync()
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def evaluating(self):
        """A context in which the model's methods (not only forward) see whole parameters."""
        if not self.sharded:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        self.model.unshard()
        stack.callback(self.model.reshard)
        return stack

    def state_dicts(self, optimizer) -> tuple[dict, dict]:
        """(model, optimizer) state dicts, whole; under FSDP a collective whose result rank 0 alone holds."""
        if not self.sharded:
            return self.model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dicts(self, optimizer, model_state: dict, optimizer_state: dict) -> None:
        """Restore whole state dicts (under FSDP, rank 0's are spread to every rank's shards)."""
        if not self.sharded:
            self.model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_state_dict(self.model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=options)  # fmt: skip

    def save_pretrained(self, directory) -> None:
        """The trained model as a from_pretrained folder, written by rank 0 (under FSDP from gathered weights)."""
        model = self.model
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.model, options=options)
            if not self.where.is_main:
                return
            model = type(self.model)(self.model.config)
            model.load_state_dict(state)
        if self.where.is_main:
            model.eval().save_pretrained(directory)

    def grad_norm_value(self, norm: Tensor) -> float:
        """clip_grad_norm_'s result as a number (a sharded norm is gathered first)."""
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


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
