"""ShiftSSM: the H3 layer's short-memory SSM, a learned causal filter of d_state taps per channel."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..ops import compute_dtype, shift_kernel, short_conv, short_conv_step
from ._cache import ParamCache
from ._checks import check_state


class ShiftSSM(nn.Module):
    """Shift SSM over channel-first inputs u (..., H, L); parameters B, C (H, N) as in docs/math.md.

    State: the last N inputs of every channel, oldest first (the shift register of the equivalent
    realisation with B = e_1, C = kernel), shape (..., H, N), real.
    """

    # The parameters of the SSM optimiser group: no weight decay, learning rate at most 1e-3 (docs/models.md).
    # The training code finds them by walking the modules; C is an ordinary weight.
    ssm_parameter_names: ClassVar[tuple[str, ...]] = ("B",)

    def __init__(self, channels: int, d_state: int = 64, device=None, dtype=None):
        super().__init__()
        if d_state < 1:
            raise ValueError(f"the shift SSM needs d_state >= 1 taps, got {d_state}")
        factory = {"device": device, "dtype": dtype}
        self.channels, self.d_state = channels, d_state
        self.B = nn.Parameter(torch.zeros(channels, d_state, **factory))
        self.C = nn.Parameter(torch.empty(channels, d_state, **factory))
        self._kernel_cache = ParamCache()  # decode steps reuse the kernel
        self._flipped_cache = ParamCache()  # ... and its time-reversed copy
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """B = e_1, C ~ U(-1/sqrt(N), 1/sqrt(N))."""
        with torch.no_grad():
            self.B.zero_()
            self.B[:, 0] = 1.0
            bound = 1 / math.sqrt(self.d_state)
            self.C.uniform_(-bound, bound)

    def kernel(self) -> Tensor:
        """The convolution kernel K[h, i] = sum_n B[h, n] C[h, n + i]; (H, N)."""
        return self._kernel_cache.get((self.B, self.C), lambda: shift_kernel(self.B, self.C))

    def init_state(self, batch_shape, device=None, dtype=None) -> Tensor:
        """Zero state (*batch_shape, H, N) in the SSM compute dtype (float32, or float64 for float64)."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        dtype = compute_dtype(dtype or self.B.dtype)
        return torch.zeros(*batch_shape, self.channels, self.d_state, device=device, dtype=dtype)

    def forward(
        self, u: Tensor, state: Tensor | None = None, return_state: bool = False, skip: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """y = K * u (+ skip * u); u (..., H, L) -> (y (..., H, L), state after u or None)."""
        if state is not None:
            check_state(state, (*u.shape[:-1], self.d_state), "shift SSM state")
        return short_conv(u, self.kernel(), skip, initial_state=state, output_final_state=return_state)

    def step(
        self, u_t: Tensor, state: Tensor, skip: Tensor | None = None, *, in_place: bool = False
    ) -> tuple[Tensor, Tensor]:
        """One step; u_t (..., H), state (..., H, N) -> (y_t (..., H), new state; `state` itself when in_place)."""
        check_state(state, (*u_t.shape, self.d_state), "shift SSM state")
        k = self.kernel()
        flipped = self._flipped_cache.get((self.B, self.C), lambda: k.flip(-1))
        return short_conv_step(u_t, state, k, skip, flipped=flipped, in_place=in_place)
