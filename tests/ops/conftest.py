"""Fixtures of the ops tests: every uninitialised buffer an op allocates starts as NaN.

A fast kernel that forgets to write part of a buffer it allocated with `torch.empty*` or `new_empty` then
fails the comparison with its reference instead of passing on whatever the allocator happened to hand out.
The poisoning is on for every test in tests/ops (autouse), so each equivalence test is also this check.
"""

from __future__ import annotations

import math

import pytest
import torch

from hippos.ops import conv, diagonal, loss, shift, state_passing

OPS_MODULES = (conv, diagonal, loss, shift, state_passing)


class NaNTorch:
    """Stands in for `torch` inside the ops modules: uninitialised allocations come back full of NaN."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def poison(self, t: torch.Tensor) -> torch.Tensor:
        """Fill a new floating or complex tensor with NaN (integer tensors have no NaN to hold)."""
        self.calls += 1
        return t.fill_(math.nan) if (t.is_floating_point() or t.is_complex()) else t

    def empty(self, *args, **kwargs):
        return self.poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self.poison(torch.empty_like(*args, **kwargs))

    def empty_strided(self, *args, **kwargs):
        return self.poison(torch.empty_strided(*args, **kwargs))


@pytest.fixture(autouse=True, scope="module")
def nan_alloc():
    """The NaNTorch in place in every ops module (and behind Tensor.new_empty) for the whole test module."""
    fake = NaNTorch()
    new_empty = torch.Tensor.new_empty

    def poisoned_new_empty(self, *args, **kwargs):
        return fake.poison(new_empty(self, *args, **kwargs))

    with pytest.MonkeyPatch.context() as patch:
        for module in OPS_MODULES:
            patch.setattr(module, "torch", fake)
        patch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)
        yield fake
