"""Checks of tensor values (token ids in range and the like) that stay out of the way where values are unknown.

A check that reads values (`ids.max()`) copies them to the host. That is what an error message needs on a real
tensor, but a tensor can also carry only its shape, dtype and device: PyTorch's fake and meta tensors (the
device tests run a whole model on a simulated GPU that way), and tensors being traced by torch.compile. Such
tensors have no values to check, so every value check asks `values_known` first and checks nothing then;
shape, dtype and device checks still run.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # PyTorch's fake tensors (torch._subclasses is where every supported release keeps them)
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - a release without them has no fake tensors to recognise
    _is_fake = None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def values_known(t: Tensor) -> bool:
    """True when t holds real values that a check may read (not a fake or meta tensor, not being compiled)."""
    if t.is_meta or torch.compiler.is_compiling():
        return False
    # A plain tensor is never fake: this answers the common case in well under a microsecond, where is_fake takes
    # about 2.5 (decode steps ask several times per layer).
    return type(t) in _PLAIN or _is_fake is None or not _is_fake(t)


def check_ids_in_range(ids: Tensor, high: int, name: str = "token ids") -> None:
    """Require integer ids in [0, high) (value part skipped where values are unknown; see module doc)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got {ids.dtype}")
    if ids.numel() == 0 or not values_known(ids):
        return
    low, top = int(ids.min()), int(ids.max())
    if low < 0 or top >= high:
        raise ValueError(f"{name} must be in 0 .. {high - 1}, got {low} .. {top}")
