"""Packed fixed-length training sequences from a token corpus, sharded across ranks.

The token stream (documents back to back, separated by end-of-text) is cut into windows of seq_len + 1
tokens that overlap by one: inputs are a window's first seq_len tokens, targets its last seq_len. Windows never
cross a segment boundary, so a window is always one contiguous slice of one memory-mapped shard.

Each epoch visits the windows in a permutation drawn from (seed, epoch); a step's global batch is a slice of
that permutation and rank r of W takes the r-th of W equal parts of it. The global batch of a step is the same
whatever the number of ranks, which is what makes a 2-process run train the same model as a 1-process run,
and it depends on the step alone, which is what makes a resumed run see the data an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class EpochOrder:
    """order(step) -> the indices (batch_size,) of that step's batch: epochs of shuffled, full batches.

    Epoch e visits the items in a permutation drawn from (seed, e) and drops its last incomplete batch. The batch
    of a step depends on the step alone, so a resumed run sees the data an uninterrupted one would. The one
    sampler of the project: packed text windows and synthetic examples both draw their batches from it.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0):
        if not 1 <= batch_size <= num_items:
            raise ValueError(f"batch_size {batch_size} must be between 1 and the {num_items} items")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.steps_per_epoch = num_items // batch_size
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_items, generator=g)
        return self._order[i * self.batch_size : (i + 1) * self.batch_size]


class PackedBatches:
    """batch_at(step) -> (inputs, targets), each (batch_size // world_size, seq_len) int64 on the CPU."""

    def __init__(
        self,
        segments: list[np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be >= 1")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must divide among {world_size} ranks (rank {rank})")
        self.segments, self.seq_len, self.seed = segments, seq_len, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        counts = [max(0, (len(s) - 1) // seq_len) for s in segments]
        self.num_windows = sum(counts)
        if self.num_windows < batch_size:
            tokens = sum(len(s) for s in segments)
            raise ValueError(
                f"{tokens} tokens make {self.num_windows} windows of {seq_len} + 1, fewer than one batch of "
                f"{batch_size}: use more text, a shorter seq_len or a smaller batch"
            )
        # Window w lives in segment seg[w] at offset start[w]: both as arrays, for vectorised lookups.
        self._segment = np.repeat(np.arange(len(segments)), counts)
        self._start = np.concatenate([np.arange(c) * seq_len for c in counts]).astype(np.int64)
        self.order = EpochOrder(self.num_windows, batch_size, seed)
        self.steps_per_epoch = self.order.steps_per_epoch

    def windows(self, index: np.ndarray) -> Tensor:
        """The windows with these indices, (n, seq_len + 1) int64."""
        rows = [self.segments[s][o : o + self.seq_len + 1] for s, o in zip(self._segment[index], self._start[index])]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        global_batch = self.order(step).numpy()
        share = self.batch_size // self.world_size
        rows = self.windows(global_batch[self.rank * share : (self.rank + 1) * share])
        return rows[:, :-1], rows[:, 1:]
