"""Input checks shared by the layers: clear errors before any work is done."""

from __future__ import annotations

from torch import Tensor


def check_sequence(x: Tensor, width: int, name: str = "x") -> None:
    """Require x to be a floating (B, L, width) tensor with L >= 1."""
    if x.dim() != 3:
        raise ValueError(f"{name} must be (batch, length, {width}), got shape {tuple(x.shape)}")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has width {x.shape[-1]} but the layer expects d_model = {width}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} is an empty sequence (length 0)")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}; embed token ids first")


def check_token(x_t: Tensor, width: int, name: str = "x_t") -> None:
    """Require x_t to be a floating (B, width) tensor: one time step."""
    if x_t.dim() != 2 or x_t.shape[-1] != width:
        raise ValueError(f"{name} must be (batch, {width}) for one step, got shape {tuple(x_t.shape)}")
    if not x_t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x_t.dtype}")


def check_state(state: Tensor, expected: tuple[int, ...], name: str) -> None:
    """Require a state tensor of exactly the expected shape."""
    if tuple(state.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(state.shape)}, expected {tuple(expected)}; "
            "build it with init_state(batch_size) or take it from the same layer"
        )


def check_d_state(d_state: int) -> None:
    """Require an even state size >= 2: the diagonal SSM's complex modes come in conjugate pairs."""
    if d_state < 2 or d_state % 2:
        raise ValueError(f"d_state must be even and >= 2 (complex modes come in conjugate pairs), got {d_state}")
