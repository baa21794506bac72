"""The shift SSM: A is the shift matrix, so its convolution kernel is a learned filter of N taps.

With state x in R^N per channel, x'[0] = 0 and x'[j] = x[j - 1] (A = shift), B and C learned:

    x_t = shift(x_{t-1}) + B u_t,   y_t = C . x_t   =>   K[i] = sum_n B[n] C[n + i]  (i < N), 0 beyond.

B starts as e_1 but is trained, so nothing here assumes it. For running the SSM step by step we keep the
equivalent realisation with B = e_1 and C = K: its state is simply the last N inputs (a shift register),
which `hippos.ops.short_conv` and `short_conv_step` run (docs/math.md, "The shift SSM"). `shift_step_ref` runs
the SSM as defined, for tests; its state is the x above, so it takes the step arguments of the ops contract,
`(u_t, state, B, C)`, but has no fast twin: the fast path is the shift register.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["shift_kernel", "shift_kernel_ref", "shift_step_ref"]


def _check(B: Tensor, C: Tensor) -> None:
    if B.dim() != 2 or B.shape != C.shape:
        raise ValueError(f"B and C must both be (H, N), got {tuple(B.shape)} and {tuple(C.shape)}")


def shift_kernel_ref(B: Tensor, C: Tensor) -> Tensor:
    """Kernel K[h, i] = sum_n B[h, n] C[h, n + i] by its definition; B, C (H, N) -> (H, N)."""
    _check(B, C)
    N = B.shape[-1]
    return torch.stack([(B[:, : N - i] * C[:, i:]).sum(-1) for i in range(N)], dim=-1)


def shift_kernel(B: Tensor, C: Tensor) -> Tensor:
    """Same as `shift_kernel_ref` as one grouped cross-correlation; B, C (H, N) -> (H, N)."""
    _check(B, C)
    H, N = B.shape
    # conv1d computes out[i] = sum_n w[n] inp[i + n]: with inp = C padded by N - 1 zeros and w = B this is
    # exactly the cross-correlation above, one group per channel.
    return F.conv1d(F.pad(C, (0, N - 1))[None], B[:, None, :], groups=H)[0]


def shift_step_ref(u_t: Tensor, state: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the shift SSM as defined; u_t (..., H), state x (..., H, N) -> (y_t (..., H), new x)."""
    _check(B, C)
    x = torch.cat([torch.zeros_like(state[..., :1]), state[..., :-1]], dim=-1) + B * u_t[..., None]
    return (C * x).sum(-1), x
