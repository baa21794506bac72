"""The H3 layer: out = (q * SSM_diag(SSM_shift(k) * v)) W_o, with multiplicative interactions.

    q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v
    k'  = shift_ssm(k) + ssm_k_D * k
    kv  = k' * v                                   (head_dim 1)
    y   = diag_ssm(kv) + D * kv
    out = (q * y) W_o + b_o

With head_dim hd > 1 each head h forms the hd x hd outer product kv[d1, d2] = k'[h, d1] v[h, d2], runs every
entry through diagonal SSM channel h, and contracts with q: out[h, d2] = sum_d1 q[h, d1] y[h, d1, d2].
Channels are ordered (h, d) on the way in and (h, d2) on the way out (docs/math.md).

The SSM part runs channel-first (B, D, L) so that both SSMs see contiguous time series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ._checks import check_d_state, check_sequence, check_token
from .decode_linear import decode_linear
from .diagonal_ssm import DiagonalSSM
from .shift_ssm import ShiftSSM
from .state import SSMState


def channel_first_linear(linear: nn.Module, x: Tensor) -> Tensor:
    """linear(x) laid out channel-first: x (B, L, D_in) -> contiguous (B, D_out, L), as W x^T + b.

    BLAS reads x^T without a copy; elementwise products on a transposed view of linear(x) instead were
    measured several times slower than on contiguous tensors, in the forward pass and the backward pass.
    """
    if not isinstance(linear, nn.Linear):  # an int8 layer (docs/quantization.md) runs its own product
        return linear(x).mT.contiguous()
    weight = linear.weight.expand(x.shape[0], -1, -1)
    if linear.bias is None:
        return torch.bmm(weight, x.mT)
    return torch.baddbmm(linear.bias[None, :, None], weight, x.mT)


@dataclass
class H3State(SSMState):
    """Recurrent state of an H3 layer: fixed size, whatever the length of the sequence behind it."""

    shift: Tensor  # (B, D, N) real: the last N inputs of the shift SSM
    diag: Tensor  # (B, H, M) complex, or (B, hd, hd, H, M) when head_dim > 1
    complex_fields: ClassVar[tuple[str, ...]] = ("diag",)


class H3(nn.Module):
    """H3 mixer; x (B, L, d_model) -> (B, L, d_model). Follows the mixer state contract (DESIGN.md)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        head_dim: int = 1,
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
        if head_dim < 1 or d_model % head_dim:
            raise ValueError(f"head_dim {head_dim} must divide d_model {d_model}")
        check_d_state(d_state)
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.head_dim = d_model, d_state, head_dim
        self.n_heads = d_model // head_dim
        self.q_proj = nn.Linear(d_model, d_model, **factory)
        self.k_proj = nn.Linear(d_model, d_model, **factory)
        self.v_proj = nn.Linear(d_model, d_model, **factory)
        self.shift = ShiftSSM(d_model, d_state, **factory)
        self.diag = DiagonalSSM(self.n_heads, d_state, ssm_init, discretization, dt_min, dt_max, mode, chunk, **factory)
        self.ssm_k_D = nn.Parameter(torch.randn(d_model, **factory))
        self.D = nn.Parameter(torch.randn(self.n_heads, **factory))
        self.output_linear = nn.Linear(d_model, d_model, **factory)

    # ---- state contract -------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> H3State:
        """Zero state for a batch: before any token."""
        hd = self.head_dim
        diag_batch = (batch_size,) if hd == 1 else (batch_size, hd, hd)
        return H3State(
            shift=self.shift.init_state(batch_size, device, dtype),
            diag=self.diag.init_state(diag_batch, device, dtype),
        )

    def forward(
        self, x: Tensor, state: H3State | None = None, return_state: bool = False, mask: Tensor | None = None
    ) -> tuple[Tensor, H3State | None]:
        """Whole sequence in parallel; x (B, L, D) -> (out (B, L, D), state after x or None).

        mask (B, L), 1 for real tokens and 0 for padding: padded positions feed nothing into either SSM, so
        with left padding the states and outputs of the real tokens are those of the unpadded sequence.
        """
        check_sequence(x, self.d_model)
        q, k, v = (channel_first_linear(proj, x) for proj in (self.q_proj, self.k_proj, self.v_proj))
        keep = None if mask is None else mask[:, None, :].to(k.dtype)
        if keep is not None:
            k = k * keep
        k, shift_state = self.shift(k, state.shift if state else None, return_state, skip=self.ssm_k_D)
        if keep is not None:
            k = k * keep  # so that kv = k' v is zero too: the diagonal SSM's input
        y, diag_state = self._diag_mix(q, k, v, state.diag if state else None, return_state)
        out = self._output(y)
        return out, (H3State(shift_state, diag_state) if return_state else None)

    def _output(self, y: Tensor) -> Tensor:
        """The output projection of channel-first y (B, D, L) -> (B, L, D)."""
        linear = self.output_linear
        if not isinstance(linear, nn.Linear):  # an int8 layer runs its own product
            return linear(y.mT)
        return torch.matmul(y.mT, linear.weight.T) + linear.bias

    def step(self, x_t: Tensor, state: H3State, *, in_place: bool = False) -> tuple[Tensor, H3State]:
        """One token; x_t (B, D) -> (out (B, D), new state).

        in_place: the new state is written into `state`'s own tensors and `state` is returned (for a caller that
        owns it alone, like the serving engine: no state-sized allocation per step); the same values.
        """
        check_token(x_t, self.d_model)
        q, k, v = (decode_linear(proj, x_t) for proj in (self.q_proj, self.k_proj, self.v_proj))
        k, shift_state = self.shift.step(k, state.shift, skip=self.ssm_k_D, in_place=in_place)
        y, diag_state = self._diag_mix(q[..., None], k[..., None], v[..., None], state.diag, None, in_place)
        out = decode_linear(self.output_linear, y[..., 0])
        return out, (state if in_place else H3State(shift_state, diag_state))

    # ---- the multiplicative core ------------------------------------------------------------------------
    def _diag_mix(self, q: Tensor, k: Tensor, v: Tensor, diag_state, return_state, in_place: bool = False):
        """q * diag_ssm(k * v) on channel-first (B, D, L) tensors; return_state None means one step (maybe in place)."""
        ssm = self.diag
        if self.head_dim == 1:
            kv = k * v
            if return_state is None:
                y, new = ssm.step(kv[..., 0], diag_state, skip=self.D, in_place=in_place)
                y = y[..., None]
            else:
                y, new = ssm(kv, diag_state, return_state, skip=self.D)
            return q * y, new
        Bsz, D, L = q.shape
        H, hd = self.n_heads, self.head_dim
        q, k, v = (t.reshape(Bsz, H, hd, L) for t in (q, k, v))
        # kv[b, d1, d2, h, l] = k'[b, h, d1, l] v[b, h, d2, l]: the channel axis h goes next to time.
        kv = torch.einsum("bhil,bhjl->bijhl", k, v)
        if return_state is None:
            y, new = ssm.step(kv[..., 0], diag_state, skip=self.D, in_place=in_place)
            y = y[..., None]
        else:
            y, new = ssm(kv, diag_state, return_state, skip=self.D)
        out = torch.einsum("bhil,bijhl->bhjl", q, y)  # (B, H, hd(d2), L): output order (h, d2)
        return out.reshape(Bsz, D, L), new
