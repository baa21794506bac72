"""The diagonal SSM (S4D): discretisation, convolution kernel and recurrence.

Per channel h and complex mode m (M = N / 2 modes), with the conjugate half implied by "2 Re":

    x_t = dA x_{t-1} + dB u_t,   y_t = 2 Re(sum_m C_m x_t[m]),   K[l] = 2 Re(sum_m C_m dB_m dA_m^l).

Parameters are complex tensors (H, M); inputs u are real (..., H, L). The ops take an optional skip D (H,)
and add D u, as every op of the contract does (see `hippos.ops`). All math runs in complex64, or complex128
when the inputs are float64 (docs/math.md, "The diagonal SSM (S4D)").

Here: the kernel (`diag_kernel`, `diag_kernel_ref`), the step (`diag_ssm_step`, `diag_ssm_step_ref`) and
the reference scan `diag_ssm_ref`; the parallel modes over a sequence are in `state_passing`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "cmul",
    "diag_kernel",
    "diag_kernel_ref",
    "diag_ssm_ref",
    "diag_ssm_step",
    "diag_ssm_step_ref",
    "discretize",
    "ssm_A",
    "step_output_weights",
    "vandermonde",
]

DISCRETIZATIONS = ("bilinear", "zoh")


def ssm_A(inv_A_real: Tensor, A_imag: Tensor) -> Tensor:
    """Continuous-time A = -exp(inv_A_real) + i A_imag (real part always negative); (H, M) -> complex."""
    return torch.complex(-torch.exp(inv_A_real), A_imag)


def discretize(log_dt: Tensor, A: Tensor, B: Tensor, method: str = "bilinear") -> tuple[Tensor, Tensor]:
    """Discrete (dA, dB), each (H, M) complex, from log_dt (H,), A (H, M) and B (H, M) complex.

    bilinear: dA = (1 + dt A / 2) / (1 - dt A / 2), dB = dt B / (1 - dt A / 2).
    zoh:      dA = exp(dt A),                       dB = B (exp(dt A) - 1) / A.
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {method!r}; choose one of {DISCRETIZATIONS}")
    dt = torch.exp(log_dt)[:, None]
    dtA = dt * A
    if method == "bilinear":
        denom = 1.0 - dtA / 2
        return (1.0 + dtA / 2) / denom, dt * B / denom
    dA = torch.exp(dtA)
    return dA, B * (dA - 1.0) / A


def diag_kernel_ref(dA: Tensor, dB: Tensor, C: Tensor, L: int) -> Tensor:
    """Kernel by its definition, materialising the (H, M, L) Vandermonde matrix; -> (H, L) real."""
    powers = dA[..., None] ** torch.arange(L, device=dA.device)
    return 2 * ((C * dB)[..., None] * powers).sum(-2).real


def vandermonde(log_dA: Tensor, exponents: Tensor) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of dA^e = exp(e log dA); log_dA (H, M) complex, exponents (E,) -> 2 x (H, M, E).

    Built from real exp, cos and sin on purpose: the CPU's complex exp is not vectorised and was measured
    about 10x slower than the three real functions together.
    """
    magnitude = torch.exp(log_dA.real[..., None] * exponents)
    angle = log_dA.imag[..., None] * exponents
    return magnitude * torch.cos(angle), magnitude * torch.sin(angle)


def diag_kernel(dA: Tensor, dB: Tensor, C: Tensor, L: int, *, block: int | None = None) -> Tensor:
    """Same as `diag_kernel_ref` with memory O(H M (block + L / block)) instead of O(H M L); -> (H, L).

    Writes l = b * block + j: K[l] = 2 Re(sum_m (C dB dA^(b block))_m dA_m^j), real matrix products of a
    (blocks x M) coefficient matrix and an (M x block) Vandermonde matrix per channel. The default block,
    about sqrt(L), makes both factors small.
    """
    H, M = dA.shape
    T = min(L, block or max(16, math.isqrt(L - 1) + 1))
    nb = -(-L // T)
    log_dA = torch.log(dA)
    real = log_dA.real.dtype
    vr, vi = vandermonde(log_dA, torch.arange(T, device=dA.device, dtype=real))  # (H, M, T)
    pr, pi = vandermonde(log_dA, torch.arange(nb, device=dA.device, dtype=real) * T)  # (H, M, nb)
    w = C * dB
    cr, ci = cmul(w.real[..., None], w.imag[..., None], pr, pi)
    # 2 Re(c v) = 2 (c.re v.re - c.im v.im), as two real batched matmuls.
    K = torch.baddbmm(torch.bmm(cr.transpose(1, 2), vr), ci.transpose(1, 2), vi, alpha=-1)
    return 2 * K.reshape(H, nb * T)[:, :L]


def cmul(ar: Tensor, ai: Tensor, br: Tensor, bi: Tensor) -> tuple[Tensor, Tensor]:
    """(ar + i ai)(br + i bi) on separate real and imaginary parts."""
    return ar * br - ai * bi, ar * bi + ai * br


def step_output_weights(C: Tensor) -> Tensor:
    """2 conj(C), materialised, (H, M) complex: what `diag_ssm_step` can take precomputed as `out_weights`."""
    return (2 * C).conj().resolve_conj()


def diag_ssm_step_ref(
    u_t: Tensor, state: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Tensor | None = None, *, in_place: bool = False
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence as defined; u_t (..., H) real, state (..., H, M) complex -> (y_t, new state)."""
    new = dA * state + dB * u_t[..., None]
    state = state.copy_(new) if in_place else new
    y = 2 * (C * state).sum(-1).real
    if D is not None:
        y = y + D * u_t
    return y.to(u_t.dtype), state


def diag_ssm_step(
    u_t: Tensor,
    state: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    out_weights: Tensor | None = None,
    in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """Same as `diag_ssm_step_ref` in three fused ops; u_t (..., H), state (..., H, M) -> (y_t (..., H), new state).

    `out_weights` may hold `step_output_weights(C)`, computed once for many steps (decoding: a step is
    measured in microseconds, so nothing is checked or recomputed here that need not be). in_place: the new
    state is written into `state` and returned, with no state-sized temporary (for a caller that owns the state
    alone; not under autograd).
    """
    u = u_t.to(state.real.dtype)
    state = state.mul_(dA) if in_place else dA * state  # in place: no state-sized temporary at all
    state = state.addcmul_(dB, u[..., None])
    w = step_output_weights(C) if out_weights is None else out_weights
    # linalg.vecdot conjugates its first argument: 2 sum_m C_m x_m = vecdot(2 conj(C), x), one fused op.
    y = torch.linalg.vecdot(w, state).real
    if D is not None:
        y = torch.addcmul(y, D.to(y.dtype), u)
    return y.to(u_t.dtype), state


def diag_ssm_ref(
    u: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The recurrence over a whole sequence, one `diag_ssm_step_ref` at a time; u (..., H, L) -> (y, final state).

    initial_state (..., H, M) complex is the state before the first input (zeros when None); the final state
    (..., H, M) is returned when output_final_state, else None.
    """
    state = initial_state
    if state is None:
        state = torch.zeros(*u.shape[:-1], dA.shape[-1], dtype=dA.dtype, device=u.device)
    ys = []
    for t in range(u.shape[-1]):
        y_t, state = diag_ssm_step_ref(u[..., t], state, dA, dB, C, D)
        ys.append(y_t)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    return y, (state if output_final_state else None)
