"""Shift SSM: the kernel against its definition, and against the recurrence it stands for."""

from __future__ import annotations

import pytest
import torch

from hippos.ops import causal_conv_ref, fft_conv, shift_kernel, shift_kernel_ref, shift_step_ref, short_conv
from tolerances import assert_close

F64 = torch.float64


def _random_BC(H, N):
    B = torch.randn(H, N, dtype=F64, requires_grad=True)  # arbitrary, not e_1: a trained B
    C = torch.randn(H, N, dtype=F64, requires_grad=True)
    return B, C


@pytest.mark.parametrize("N", [1, 2, 7, 16])
def test_kernel_matches_reference(N, compare_with_grads):
    B, C = _random_BC(5, N)
    compare_with_grads(lambda: shift_kernel(B, C), lambda: shift_kernel_ref(B, C), [B, C])


def test_reference_kernel_by_hand():
    B = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    C = torch.tensor([[4.0, 5.0, 6.0]], dtype=F64)
    # K[0] = 1*4 + 2*5 + 3*6, K[1] = 1*5 + 2*6, K[2] = 1*6
    expected = torch.tensor([[32.0, 17.0, 6.0]], dtype=F64)
    assert torch.equal(shift_kernel_ref(B, C), expected)
    assert_close(shift_kernel(B, C), expected, strict=True)


def test_e1_kernel_is_C():
    C = torch.randn(4, 8, dtype=F64)
    B = torch.zeros(4, 8, dtype=F64)
    B[:, 0] = 1.0
    assert_close(shift_kernel(B, C), C, strict=True)


def _recurrence(u, B, C):
    """Run shift_step_ref over u (..., H, L) from a zero state: the SSM as defined."""
    x = torch.zeros(*u.shape[:-1], B.shape[-1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        y_t, x = shift_step_ref(u[..., t], x, B, C)
        ys.append(y_t)
    return torch.stack(ys, dim=-1)


@pytest.mark.parametrize(
    "conv",
    [causal_conv_ref, fft_conv, lambda u, k: short_conv(u, k)[0]],
    ids=["causal_conv_ref", "fft_conv", "short_conv"],
)
@pytest.mark.parametrize(("lead", "L"), [((), 1), ((2,), 5), ((2,), 30), ((2, 3), 17)])
def test_kernel_reproduces_recurrence(conv, lead, L, compare_with_grads):
    H, N = 3, 8
    B, C = _random_BC(H, N)
    u = torch.randn(*lead, H, L, dtype=F64, requires_grad=True)
    compare_with_grads(lambda: conv(u, shift_kernel(B, C)), lambda: _recurrence(u, B, C), [u, B, C])


def test_impulse_response_has_N_taps():
    H, N = 2, 6
    B, C = _random_BC(H, N)
    u = torch.zeros(H, 3 * N, dtype=F64)
    u[:, 0] = 1.0
    y = _recurrence(u, B, C).detach()
    assert_close(y[:, :N], shift_kernel_ref(B, C).detach(), strict=True)
    assert (y[:, N:] == 0).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="B and C must both be"):
        shift_kernel(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="B and C must both be"):
        shift_kernel_ref(torch.randn(4), torch.randn(4))
