"""DiagonalSSM: the S4D long-memory SSM with three equivalent ways to run it over a sequence."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..ops import (
    compute_dtype,
    diag_kernel,
    diag_ssm_chunked,
    diag_ssm_fft,
    diag_ssm_step,
    discretize,
    ssm_A,
    step_output_weights,
)
from ..ops.diagonal import DISCRETIZATIONS
from ._cache import ParamCache
from ._checks import check_d_state, check_state

INITS = ("lin", "inv")
MODES = ("auto", "fft", "chunked")

# Above this length `mode="auto"` uses chunked state passing, below it the FFT convolution. Both are exact;
# this is only about speed (see `hippos bench layer` and benchmarks/RESULTS.md for the measurement).
AUTO_CHUNKED_FROM = 4096


def s4d_init(channels: int, d_state: int, init: str, dt_min: float, dt_max: float, generator=None):
    """Initial (log_dt (H,), inv_A_real (H, M), A_imag (H, M), B (H, M, 2), C (H, M, 2)) for M = N / 2.

    lin: A_m = -1/2 + i pi m.  inv: A_m = -1/2 + i (N / pi) (N / (1 + 2m) - 1).  B = 1, C complex normal,
    log_dt ~ U(log dt_min, log dt_max).
    """
    if init not in INITS:
        raise ValueError(f"unknown S4D init {init!r}; choose one of {INITS}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    M = d_state // 2
    m = torch.arange(M, dtype=torch.float64)
    imag = math.pi * m if init == "lin" else (d_state / math.pi) * (d_state / (1 + 2 * m) - 1)
    u = torch.rand(channels, generator=generator, dtype=torch.float64)
    log_dt = math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min))
    # The real part is kept at most -1e-4 so that exp(inv_A_real) stays a valid (positive) decay rate.
    inv_A_real = torch.full((channels, M), math.log(max(0.5, 1e-4)), dtype=torch.float64)
    B = torch.zeros(channels, M, 2, dtype=torch.float64)
    B[..., 0] = 1.0
    C = torch.randn(channels, M, 2, generator=generator, dtype=torch.float64) / math.sqrt(2)
    return log_dt, inv_A_real, imag.expand(channels, M).clone(), B, C


class DiagonalSSM(nn.Module):
    """Diagonal (S4D) SSM over channel-first inputs u (..., H, L); parameters as in docs/math.md.

    Complex parameters are stored as real (..., 2) pairs (re, im), the layout of the official checkpoints.
    State: the complex SSM state (..., H, M), M = d_state / 2 (complex64, complex128 for float64 inputs).
    `mode` picks how `forward` runs: "fft" (`diag_ssm_fft`, convolution with the whole kernel: an FFT or for
    short sequences a Toeplitz matmul), "chunked" (`diag_ssm_chunked`, FlashConv state passing) or "auto"
    (the faster of the two for the length at hand). All give the same result.
    """

    # The parameters of the SSM optimiser group: no weight decay, learning rate at most 1e-3 (docs/models.md).
    # The training code finds them by walking the modules; C is an ordinary weight.
    ssm_parameter_names: ClassVar[tuple[str, ...]] = ("log_dt", "inv_A_real", "A_imag", "B")

    def __init__(
        self,
        channels: int,
        d_state: int = 64,
        init: str = "lin",
        discretization: str = "bilinear",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        mode: str = "auto",
        chunk: int = 64,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_d_state(d_state)
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"unknown discretization {discretization!r}; choose one of {DISCRETIZATIONS}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        self.channels, self.d_state, self.n_modes = channels, d_state, d_state // 2
        self.init, self.dt_min, self.dt_max = init, dt_min, dt_max
        self.discretization, self.mode, self.chunk = discretization, mode, chunk
        factory = {"device": device, "dtype": dtype}
        M = self.n_modes
        self.log_dt = nn.Parameter(torch.empty(channels, **factory))
        self.inv_A_real = nn.Parameter(torch.empty(channels, M, **factory))
        self.A_imag = nn.Parameter(torch.empty(channels, M, **factory))
        self.B = nn.Parameter(torch.empty(channels, M, 2, **factory))
        self.C = nn.Parameter(torch.empty(channels, M, 2, **factory))
        self._discrete_cache = ParamCache()  # decode steps reuse the discrete system
        self._step_cache = ParamCache()  # ... and what a step needs of it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the parameters from the configured initialisation."""
        values = s4d_init(self.channels, self.d_state, self.init, self.dt_min, self.dt_max)
        with torch.no_grad():
            for p, v in zip(self.parameters_list(), values):
                p.copy_(v)

    def discrete(self) -> tuple[Tensor, Tensor, Tensor]:
        """(dA, dB, C), each (H, M) complex, in complex64 (complex128 for float64 parameters)."""
        return self._discrete_cache.get(self.parameters_list(), self._discretize)

    def parameters_list(self) -> list[nn.Parameter]:
        """The parameters the discrete system depends on."""
        return [self.log_dt, self.inv_A_real, self.A_imag, self.B, self.C]

    def _step_constants(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dA, dB, C = self.discrete()
        return dA, dB, C, step_output_weights(C)

    def _discretize(self) -> tuple[Tensor, Tensor, Tensor]:
        cdt = compute_dtype(self.log_dt.dtype)
        A = ssm_A(self.inv_A_real.to(cdt), self.A_imag.to(cdt))
        B = torch.view_as_complex(self.B.to(cdt).contiguous())
        C = torch.view_as_complex(self.C.to(cdt).contiguous())
        dA, dB = discretize(self.log_dt.to(cdt), A, B, self.discretization)
        return dA, dB, C

    def kernel(self, length: int) -> Tensor:
        """Convolution kernel (H, length), computed without materialising (H, M, length)."""
        return diag_kernel(*self.discrete(), length)

    def init_state(self, batch_shape, device=None, dtype=None) -> Tensor:
        """Zero complex state (*batch_shape, H, M)."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        ctype = torch.complex128 if compute_dtype(dtype or self.log_dt.dtype) == torch.float64 else torch.complex64
        return torch.zeros(*batch_shape, self.channels, self.n_modes, device=device, dtype=ctype)

    def resolve_mode(self, length: int) -> str:
        """The execution mode `forward` uses for a sequence of this length."""
        if self.mode != "auto":
            return self.mode
        return "chunked" if length >= AUTO_CHUNKED_FROM else "fft"

    def forward(
        self, u: Tensor, state: Tensor | None = None, return_state: bool = False, skip: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """y = SSM(u) (+ skip * u); u (..., H, L) -> (y (..., H, L), final state (..., H, M) or None)."""
        if state is not None:
            check_state(state, (*u.shape[:-1], self.n_modes), "diagonal SSM state")
        op = diag_ssm_chunked if self.resolve_mode(u.shape[-1]) == "chunked" else diag_ssm_fft
        return op(u, *self.discrete(), skip, state, return_state, chunk=self.chunk)

    def step(
        self, u_t: Tensor, state: Tensor, skip: Tensor | None = None, *, in_place: bool = False
    ) -> tuple[Tensor, Tensor]:
        """One recurrent step; u_t (..., H), state (..., H, M) -> (y_t (..., H), new state; `state` when in_place)."""
        check_state(state, (*u_t.shape, self.n_modes), "diagonal SSM state")
        dA, dB, C, out_weights = self._step_cache.get(self.parameters_list(), self._step_constants)
        return diag_ssm_step(u_t, state, dA, dB, C, skip, out_weights=out_weights, in_place=in_place)
