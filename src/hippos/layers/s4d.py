"""S4D baseline mixer (the paper's comparison): diagonal SSM + skip, GELU, output projection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_sequence, check_token
from .decode_linear import decode_linear
from .diagonal_ssm import DiagonalSSM
from .state import SSMState


@dataclass
class S4DState(SSMState):
    """Recurrent state of an S4D layer: the diagonal SSM's state, fixed size."""

    diag: Tensor  # (B, D, M) complex
    complex_fields: ClassVar[tuple[str, ...]] = ("diag",)


class S4D(nn.Module):
    """out = W_o GELU(diag_ssm(x) + D x) + b_o; x (B, L, d_model). State: an S4DState."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        ssm_init: str = "lin",
        discretization: str = "bilinear",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        mode: str = "auto",
        chunk: int = 64,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state = d_model, d_state
        self.diag = DiagonalSSM(d_model, d_state, ssm_init, discretization, dt_min, dt_max, mode, chunk, **factory)
        self.D = nn.Parameter(torch.randn(d_model, **factory))
        self.output_linear = nn.Linear(d_model, d_model, **factory)

    def init_state(self, batch_size: int, device=None, dtype=None) -> S4DState:
        """Zero state for a batch: before any token."""
        return S4DState(self.diag.init_state(batch_size, device, dtype))

    def forward(
        self, x: Tensor, state: S4DState | None = None, return_state: bool = False, mask: Tensor | None = None
    ) -> tuple[Tensor, S4DState | None]:
        """Whole sequence in parallel; x (B, L, D) -> (out (B, L, D), state after x or None).

        mask (B, L), 1 for real tokens and 0 for padding: padded positions feed nothing into the SSM.
        """
        check_sequence(x, self.d_model)
        u = x.transpose(1, 2)
        if mask is not None:
            u = u * mask[:, None, :].to(u.dtype)
        y, diag = self.diag(u, state.diag if state is not None else None, return_state, skip=self.D)
        return self.output_linear(F.gelu(y.transpose(1, 2))), (S4DState(diag) if return_state else None)

    def step(self, x_t: Tensor, state: S4DState, *, in_place: bool = False) -> tuple[Tensor, S4DState]:
        """One token; x_t (B, D) -> (out (B, D), new state; `state` itself, updated, when in_place: see H3.step)."""
        check_token(x_t, self.d_model)
        y, diag = self.diag.step(x_t, state.diag, skip=self.D, in_place=in_place)
        return decode_linear(self.output_linear, F.gelu(y)), (state if in_place else S4DState(diag))
