"""Chunked state passing and the convolution mode's state terms against the recurrence, for many chunkings.

(tests/ops/test_contract.py holds every op of the contract to its reference over lengths and batch shapes;
here: chunk sizes, discretisations, dtypes and the state terms on their own.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hippos.ops import diag_ssm_chunked, diag_ssm_fft, diag_ssm_ref
from hippos.ops.state_passing import _final_state, _state_outputs
from tolerances import assert_close

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
        return diag_ssm_chunked(u, *p.discrete(), D, h0(), True, chunk=chunk)

    def ref():
        return diag_ssm_ref(u, *p.discrete(), D, h0(), True)

    compare_with_grads(fast, ref, inputs)


@pytest.mark.parametrize("lead", [(), (2, 2)], ids=["rank2", "rank4"])
def test_chunked_zoh_and_batch_ranks(lead, s4d_params, compare_with_grads):
    p = s4d_params(H, M)
    u = torch.randn(*lead, H, 19, dtype=F64, requires_grad=True)
    s0 = _state_leaf(lead)

    def fast():
        return diag_ssm_chunked(
            u, *p.discrete("zoh"), initial_state=torch.view_as_complex(s0), output_final_state=True, chunk=6
        )

    def ref():
        return diag_ssm_ref(u, *p.discrete("zoh"), initial_state=torch.view_as_complex(s0), output_final_state=True)

    compare_with_grads(fast, ref, [u, s0, *p.leaves()])


def test_chunked_output_dtypes(s4d_params):
    p = s4d_params(H, M, requires_grad=False)
    u = torch.randn(2, H, 10, dtype=F64)
    for op in (diag_ssm_chunked, diag_ssm_fft):
        y, h = op(u, *p.discrete(), output_final_state=True, chunk=4)
        assert y.dtype == F64 and y.shape == u.shape
        assert h.dtype == torch.complex128 and h.shape == (2, H, M)
        y32, h32 = op(u.float(), *p.discrete(), output_final_state=True, chunk=4)
        assert y32.dtype == torch.float32 and h32.dtype == torch.complex64


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize(("L", "chunk"), CHUNKINGS)
def test_fft_mode_matches_recurrence(L, chunk, with_state, s4d_params, compare_with_grads):
    """The convolution mode's state contract: conv(u, K) + outputs of the initial state, and the final state."""
    p = s4d_params(H, M)
    u = torch.randn(2, H, L, dtype=F64, requires_grad=True)
    s0 = _state_leaf((2,)) if with_state else None
    inputs = [u, *p.leaves()] + ([s0] if with_state else [])

    def h0():
        return torch.view_as_complex(s0) if with_state else None

    def fast():
        return diag_ssm_fft(u, *p.discrete(), initial_state=h0(), output_final_state=True, chunk=chunk)

    def ref():
        return diag_ssm_ref(u, *p.discrete(), initial_state=h0(), output_final_state=True)

    compare_with_grads(fast, ref, inputs)


def test_state_outputs_alone(s4d_params):
    """With zero input the recurrence's output is exactly the initial state's contribution."""
    p = s4d_params(H, M, requires_grad=False)
    dA, dB, C = p.discrete()
    h0 = torch.randn(2, 2, H, M, dtype=torch.complex128)
    u = torch.zeros(2, 2, H, 30, dtype=F64)
    y_ref, h_ref = diag_ssm_ref(u, dA, dB, C, initial_state=h0, output_final_state=True)
    for chunk in (1, 7, 30, 100):
        y = _state_outputs(h0, dA, C, 30, F64, chunk)
        assert y.shape == u.shape and y.dtype == F64
        assert_close(y, y_ref)
        assert_close(_final_state(u, dA, dB, h0, chunk), h_ref)


def test_state_shape_error(s4d_params):
    p = s4d_params(H, M, requires_grad=False)
    u = torch.randn(2, H, 5, dtype=F64)
    bad = torch.zeros(3, H, M, dtype=torch.complex128)
    for op in (diag_ssm_chunked, diag_ssm_fft):
        with pytest.raises(ValueError, match="initial_state must be"):
            op(u, *p.discrete(), initial_state=bad)


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
    y_ref, h_ref = diag_ssm_ref(u, dA, dB, C, initial_state=h0, output_final_state=True)
    for op in (diag_ssm_chunked, diag_ssm_fft):
        y, h = op(u, dA, dB, C, initial_state=h0, output_final_state=True, chunk=chunk)
        assert torch.isfinite(y).all()
        assert_close(y, y_ref)
        assert_close(h, h_ref)
