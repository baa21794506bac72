"""FlashConv state passing against the step-by-step recurrence, with and without an initial state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hippos.ops import (
    diag_final_state,
    diag_kernel_ref,
    diag_scan_ref,
    diag_ssm_chunked,
    diag_state_outputs,
    fft_conv,
)

F64 = torch.float64
H, M = 3, 4
# (L, chunk): chunk divides L, does not, chunk 1, chunk > L, L = 1
CHUNKINGS = [(24, 8), (25, 8), (23, 5), (13, 1), (10, 64), (1, 4), (1, 1)]


def _state_leaf(lead):
    """A complex initial state built from a real leaf (..., H, M, 2) so its gradient is a plain tensor."""
    return torch.randn(*lead, H, M, 2, dtype=F64, requires_grad=True)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize(("L", "chunk"), CHUNKINGS)
def test_chunked_matches_recurrence(L, chunk, with_state, s4d_params, compare_with_grads):
    p = s4d_params(H, M)
    lead = (2,)
    u = torch.randn(*lead, H, L, dtype=F64, requires_grad=True)
    D = torch.randn(H, dtype=F64, requires_grad=True)
    s0 = _state_leaf(lead) if with_state else None
    inputs = [u, D, *p.leaves()] + ([s0] if with_state else [])

    def h0():
        return torch.view_as_complex(s0) if with_state else None

    def fast():
        return diag_ssm_chunked(u, *p.discrete(), D=D, state=h0(), chunk=chunk)

    def ref():
        y, h = diag_scan_ref(u, *p.discrete(), state=h0())
        return y + D[:, None] * u, h

    compare_with_grads(fast, ref, inputs)


@pytest.mark.parametrize("lead", [(), (2, 2)], ids=["rank2", "rank4"])
def test_chunked_zoh_and_batch_ranks(lead, s4d_params, compare_with_grads):
    p = s4d_params(H, M)
    u = torch.randn(*lead, H, 19, dtype=F64, requires_grad=True)
    s0 = _state_leaf(lead)

    def fast():
        return diag_ssm_chunked(u, *p.discrete("zoh"), state=torch.view_as_complex(s0), chunk=6)

    def ref():
        return diag_scan_ref(u, *p.discrete("zoh"), state=torch.view_as_complex(s0))

    compare_with_grads(fast, ref, [u, s0, *p.leaves()])


def test_chunked_output_dtypes(s4d_params):
    p = s4d_params(H, M, requires_grad=False)
    u = torch.randn(2, H, 10, dtype=F64)
    y, h = diag_ssm_chunked(u, *p.discrete(), chunk=4)
    assert y.dtype == F64 and y.shape == u.shape
    assert h.dtype == torch.complex128 and h.shape == (2, H, M)
    y32, h32 = diag_ssm_chunked(u.float(), *p.discrete(), chunk=4)
    assert y32.dtype == torch.float32 and h32.dtype == torch.complex64


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize(("L", "chunk"), CHUNKINGS)
def test_fft_plus_state_terms_match_recurrence(L, chunk, with_state, s4d_params, compare_with_grads):
    """The FFT path's state contract: conv(u, K) + outputs of the initial state, and the final state."""
    p = s4d_params(H, M)
    u = torch.randn(2, H, L, dtype=F64, requires_grad=True)
    s0 = _state_leaf((2,)) if with_state else None
    inputs = [u, *p.leaves()] + ([s0] if with_state else [])

    def h0():
        return torch.view_as_complex(s0) if with_state else None

    def fast():
        dA, dB, C = p.discrete()
        y = fft_conv(u, diag_kernel_ref(dA, dB, C, L))
        if with_state:
            y = y + diag_state_outputs(h0(), dA, C, L, u.dtype, chunk=chunk)
        return y, diag_final_state(u, dA, dB, h0(), chunk=chunk)

    def ref():
        return diag_scan_ref(u, *p.discrete(), state=h0())

    compare_with_grads(fast, ref, inputs)


def test_state_outputs_alone(s4d_params):
    """With zero input the recurrence's output is exactly the initial state's contribution."""
    p = s4d_params(H, M, requires_grad=False)
    dA, dB, C = p.discrete()
    h0 = torch.randn(2, 2, H, M, dtype=torch.complex128)
    u = torch.zeros(2, 2, H, 30, dtype=F64)
    y_ref, h_ref = diag_scan_ref(u, dA, dB, C, h0)
    for chunk in (1, 7, 30, 100):
        y = diag_state_outputs(h0, dA, C, 30, F64, chunk=chunk)
        assert y.shape == u.shape and y.dtype == F64
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(diag_final_state(u, dA, dB, h0, chunk=chunk), h_ref, rtol=1e-10, atol=1e-12)


def test_state_shape_error(s4d_params):
    p = s4d_params(H, M, requires_grad=False)
    u = torch.randn(2, H, 5, dtype=F64)
    bad = torch.zeros(3, H, M, dtype=torch.complex128)
    with pytest.raises(ValueError, match="state must be"):
        diag_ssm_chunked(u, *p.discrete(), state=bad)
    with pytest.raises(ValueError, match="state must be"):
        diag_final_state(u, *p.discrete()[:2], state=bad)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    L=st.integers(1, 70),
    chunk=st.integers(1, 80),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_chunked_equals_recurrence(batch, L, chunk, with_state, seed, s4d_params):
    p = s4d_params(H, M, seed=seed, requires_grad=False)
    dA, dB, C = p.discrete()
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, H, L, generator=g, dtype=F64)
    h0 = torch.randn(batch, H, M, generator=g, dtype=torch.complex128) if with_state else None
    y, h = diag_ssm_chunked(u, dA, dB, C, state=h0, chunk=chunk)
    y_ref, h_ref = diag_scan_ref(u, dA, dB, C, state=h0)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(diag_final_state(u, dA, dB, h0, chunk=chunk), h_ref, rtol=1e-10, atol=1e-11)
