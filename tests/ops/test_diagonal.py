"""Diagonal SSM: discretisation, the blocked Vandermonde kernel, and the recurrence vs the convolution."""

from __future__ import annotations

import pytest
import torch

from hippos.ops import (
    causal_conv_ref,
    diag_kernel,
    diag_kernel_ref,
    diag_ssm_ref,
    diag_ssm_step,
    diag_ssm_step_ref,
    discretize,
    ssm_A,
)
from tolerances import assert_close

F64 = torch.float64
METHODS = ["bilinear", "zoh"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("L", "block"),
    [(1, 256), (1, 1), (16, 4), (17, 4), (30, 7), (30, 30), (30, 64), (50, 1), (200, 256)],
)
def test_kernel_matches_reference(method, L, block, s4d_params, compare_with_grads):
    p = s4d_params(3, 4)

    def fast():
        return diag_kernel(*p.discrete(method), L, block=block)

    def ref():
        return diag_kernel_ref(*p.discrete(method), L)

    compare_with_grads(fast, ref, p.leaves())


def test_kernel_default_block_longer_sequence(s4d_params):
    p = s4d_params(2, 3, requires_grad=False)
    dA, dB, C = p.discrete()
    k = diag_kernel(dA, dB, C, 600)  # more than one default block of 256, and not a multiple of it
    assert k.shape == (2, 600)
    assert_close(k, diag_kernel_ref(dA, dB, C, 600))


def test_ssm_A_and_discretize_formulas(s4d_params):
    p = s4d_params(3, 4, requires_grad=False)
    A = ssm_A(p.inv_A_real, p.A_imag)
    assert (A.real < 0).all()
    assert torch.equal(A.real, -torch.exp(p.inv_A_real))
    assert torch.equal(A.imag, p.A_imag)
    Bc = torch.view_as_complex(p.B)
    dt = torch.exp(p.log_dt)[:, None]
    dA, dB = discretize(p.log_dt, A, Bc, "bilinear")
    assert_close(dA, (1 + dt * A / 2) / (1 - dt * A / 2), strict=True)
    assert_close(dB, dt * Bc / (1 - dt * A / 2), strict=True)
    dA, dB = discretize(p.log_dt, A, Bc, "zoh")
    assert_close(dA, torch.exp(dt * A), strict=True)
    assert_close(dB, Bc * (torch.exp(dt * A) - 1) / A, strict=True)
    assert (dA.abs() < 1).all()  # a stable A gives a decaying discrete system


def test_discretize_unknown_method(s4d_params):
    p = s4d_params(2, 2, requires_grad=False)
    with pytest.raises(ValueError, match="unknown discretization 'euler'"):
        discretize(p.log_dt, ssm_A(p.inv_A_real, p.A_imag), torch.view_as_complex(p.B), "euler")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("lead", "L"), [((), 1), ((2,), 37), ((2, 2), 12)])
def test_recurrence_equals_convolution(method, lead, L, s4d_params, compare_with_grads):
    p = s4d_params(3, 4)
    u = torch.randn(*lead, 3, L, dtype=F64, requires_grad=True)

    def scan():
        return diag_ssm_ref(u, *p.discrete(method))[0]

    def convolve():
        return causal_conv_ref(u, diag_kernel_ref(*p.discrete(method), L))

    compare_with_grads(scan, convolve, [u, *p.leaves()])


def test_scan_final_state_by_hand(s4d_params):
    """Final state of the scan = sum_i dA^(L-1-i) dB u_i + dA^L h0, and a step is one step of it."""
    p = s4d_params(3, 4, requires_grad=False)
    dA, dB, C = p.discrete()
    L = 9
    u = torch.randn(2, 3, L, dtype=F64)
    h0 = torch.randn(2, 3, 4, dtype=torch.complex128)
    _, h = diag_ssm_ref(u, dA, dB, C, initial_state=h0, output_final_state=True)
    expected = dA**L * h0 + sum(dA ** (L - 1 - i) * dB * u[..., i, None] for i in range(L))
    assert_close(h, expected, strict=True, scale=10)  # nine steps of rounding, in another order
    D = torch.randn(3, dtype=F64)
    for step in (diag_ssm_step, diag_ssm_step_ref):
        y0, h1 = step(u[..., 0], h0, dA, dB, C, D)
        assert_close(h1, dA * h0 + dB * u[..., 0, None], strict=True)
        assert_close(y0, 2 * (C * h1).sum(-1).real + D * u[..., 0], strict=True)


def test_step_dtypes(s4d_params):
    """Half-precision input: the state stays complex64, the output comes back in the input dtype."""
    p = s4d_params(3, 4, requires_grad=False)
    dA, dB, C = (t.to(torch.complex64) for t in p.discrete())
    state = torch.zeros(2, 3, 4, dtype=torch.complex64)
    for step in (diag_ssm_step, diag_ssm_step_ref):
        y, new = step(torch.randn(2, 3, dtype=torch.bfloat16), state, dA, dB, C, torch.randn(3))
        assert y.dtype == torch.bfloat16 and new.dtype == torch.complex64
