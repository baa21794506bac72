"""A value derived from parameters, kept between decode steps while the parameters do not change."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..ops.checks import values_known


class ParamCache:
    """Recompute `compute()` only when a parameter changed (new storage, in-place update, dtype, device).

    Only used when no autograd graph is needed: with gradients enabled and trainable parameters the value
    is computed afresh every call, so training never sees a stale or graph-less value.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value = None

    def get(self, params: Sequence[nn.Parameter], compute: Callable):
        """compute(), or the value kept from the last call with the same parameters."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return compute()
        if not values_known(params[0]):  # fake parameters (a module's are all fake or none): no storage to key on
            return compute()
        key = (torch.is_inference_mode_enabled(),) + tuple(
            (p.data_ptr(), p._version, p.dtype, p.device) for p in params
        )
        if key != self._key:
            self._value, self._key = compute(), key
        return self._value
