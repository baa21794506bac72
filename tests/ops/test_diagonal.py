"""Diagonal SSM: discretisation, the blocked Vandermonde kernel, and the recurrence vs the convolution."""

from __future__ import annotations

import pytest
import torch

from hippos.ops import (
    causal_conv_ref,
    diag_kernel,
    diag_kernel_ref,
    diag_scan_ref,
    diag_step,
    discretize,
    ssm_A,
)

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
    torch.testing.assert_close(k, diag_kernel_ref(dA, dB, C, 600), rtol=1e-10, atol=1e-12)


def test_ssm_A_and_discretize_formulas(s4d_params):
    p = s4d_params(3, 4, requires_grad=False)
    A = ssm_A(p.inv_A_real, p.A_imag)
    assert (A.real < 0).all()
    torch.testing.assert_close(A.real, -torch.exp(p.inv_A_real), rtol=0, atol=0)
    torch.testing.assert_close(A.imag, p.A_imag, rtol=0, atol=0)
    Bc = torch.view_as_complex(p.B)
    dt = torch.exp(p.log_dt)[:, None]
    dA, dB = discretize(p.log_dt, A, Bc, "bilinear")
    torch.testing.assert_close(dA, (1 + dt * A / 2) / (1 - dt * A / 2), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(dB, dt * Bc / (1 - dt * A / 2), rtol=1e-13, atol=1e-14)
    dA, dB = discretize(p.log_dt, A, Bc, "zoh")
    torch.testing.assert_close(dA, torch.exp(dt * A), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(dB, Bc * (torch.exp(dt * A) - 1) / A, rtol=1e-13, atol=1e-14)
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
        return diag_scan_ref(u, *p.discrete(method))[0]

    def convolve():
        return causal_conv_ref(u, diag_kernel_ref(*p.discrete(method), L))

    compare_with_grads(scan, convolve, [u, *p.leaves()])


def test_scan_final_state_by_hand(s4d_params):
    """Final state of the scan = sum_i dA^(L-1-i) dB u_i + dA^L h0, and diag_step is one step of it."""
    p = s4d_params(3, 4, requires_grad=False)
    dA, dB, C = p.discrete()
    L = 9
    u = torch.randn(2, 3, L, dtype=F64)
    h0 = torch.randn(2, 3, 4, dtype=torch.complex128)
    _, h = diag_scan_ref(u, dA, dB, C, h0)
    expected = dA**L * h0 + sum(dA ** (L - 1 - i) * dB * u[..., i, None] for i in range(L))
    torch.testing.assert_close(h, expected, rtol=1e-12, atol=1e-12)
    y0, h1 = diag_step(u[..., 0], h0, dA, dB, C)
    torch.testing.assert_close(h1, dA * h0 + dB * u[..., 0, None], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y0, 2 * (C * h1).sum(-1).real, rtol=1e-13, atol=1e-13)
