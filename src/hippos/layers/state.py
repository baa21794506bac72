"""The one protocol every mixer state follows, so that nothing outside a layer looks at a state's type.

A mixer state (H3State, S4DState, AttentionState) is a small dataclass whose tensors carry the batch on their
first axis. Every state offers the same operations (docs/state.md):

    state.batch_size                  number of rows
    state.select(rows)                rows picked, reordered, dropped or repeated (a LongTensor or a list)
    type(state).concat(states)        the rows of several states of the same layer, stacked
    state.to(device, dtype)           dtype is the activation dtype: SSM states keep their compute precision
    state.to_tensors()                named real tensors (complex ones as view_as_real pairs): files, caches
    type(state).from_tensors(named)   the inverse

States are values: no operation changes a state that another holder may still use, so one state can seed
several continuations. Every state class is registered here by its name, so that a state file can say which
class rebuilds each layer's state (`state_type`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..ops import compute_dtype

STATE_TYPES: dict[str, type[MixerState]] = {}  # class name -> class, filled as the classes are defined


def state_type(name: str) -> type[MixerState]:
    """The registered state class of this name (as written by `type(state).__name__`)."""
    if name not in STATE_TYPES:
        raise ValueError(f"unknown mixer state type {name!r}; known: {sorted(STATE_TYPES)}")
    return STATE_TYPES[name]


def row_index(rows: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """rows as a 1-D long tensor on `device`, for index_select."""
    index = torch.as_tensor(rows, dtype=torch.long, device=device)
    if index.dim() != 1:
        raise ValueError(f"rows must be a 1-D list or tensor of row indices, got shape {tuple(index.shape)}")
    return index


def check_concat(cls: type, states: Sequence) -> None:
    """Refuse an empty list and states of other classes than cls (they come from another kind of layer)."""
    if not states:
        raise ValueError("concat needs at least one state")
    for s in states:
        if type(s) is not cls:
            raise TypeError(f"cannot concat a {type(s).__name__} into {cls.__name__}: states of different layers")


class MixerState:
    """Base class of the mixer states: registers each subclass by name. Subclasses implement the protocol."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        STATE_TYPES[cls.__name__] = cls

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        raise NotImplementedError

    def select(self, rows: Tensor | Sequence[int]) -> MixerState:
        """A state of the given rows of this one (any order, repeats allowed)."""
        raise NotImplementedError

    @classmethod
    def concat(cls, states: Sequence[MixerState]) -> MixerState:
        """One state holding the rows of every state in turn."""
        raise NotImplementedError

    def to(self, device=None, dtype: torch.dtype | None = None) -> MixerState:
        """This state on another device, for activations of another dtype."""
        raise NotImplementedError

    def to_tensors(self) -> dict[str, Tensor]:
        """Named real tensors that `from_tensors` turns back into this state."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> MixerState:
        """The state `to_tensors` described."""
        raise NotImplementedError


class SSMState(MixerState):
    """A fixed-size SSM state: a dataclass whose fields are all tensors (B, ...) in the SSM compute precision.

    Real fields are float32 (float64 for float64 models), complex fields complex64 (complex128), whatever the
    activation dtype: the recurrences accumulate over the whole sequence (docs/math.md, numerics).
    """

    complex_fields: ClassVar[tuple[str, ...]] = ()  # stored as view_as_real pairs by to_tensors

    def _fields(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return next(iter(self._fields().values())).shape[0]

    def select(self, rows: Tensor | Sequence[int]) -> SSMState:
        """A state of the given rows of this one (any order, repeats allowed)."""
        fields = self._fields()
        index = row_index(rows, next(iter(fields.values())).device)
        return type(self)(**{name: t.index_select(0, index) for name, t in fields.items()})

    @classmethod
    def concat(cls, states: Sequence[SSMState]) -> SSMState:
        """One state holding the rows of every state in turn."""
        check_concat(cls, states)
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: torch.cat([getattr(s, name) for s in states]) for name in names})

    def to(self, device=None, dtype: torch.dtype | None = None) -> SSMState:
        """This state on `device`, in the compute precision of activations of `dtype` (None: unchanged)."""
        return type(self)(**{name: t.to(device, _ssm_dtype(t, dtype)) for name, t in self._fields().items()})

    def to_tensors(self) -> dict[str, Tensor]:
        """Named real tensors; complex fields as (..., 2) (re, im) pairs."""
        return {name: torch.view_as_real(t) if t.is_complex() else t for name, t in self._fields().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> SSMState:
        """The state `to_tensors` described."""
        names = [f.name for f in dataclasses.fields(cls)]
        if set(tensors) != set(names):
            raise ValueError(f"{cls.__name__} needs tensors {names}, got {sorted(tensors)}")
        as_complex = lambda t: torch.view_as_complex(t.contiguous())  # noqa: E731
        return cls(**{n: as_complex(tensors[n]) if n in cls.complex_fields else tensors[n] for n in names})


def _ssm_dtype(t: Tensor, activation: torch.dtype | None) -> torch.dtype | None:
    """The dtype an SSM state tensor takes for activations of this dtype (None: keep its own)."""
    if activation is None:
        return None
    real = compute_dtype(activation)
    if t.is_complex():
        return torch.complex128 if real == torch.float64 else torch.complex64
    return real
