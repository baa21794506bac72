"""Causal convolutions: fft_conv and short_conv against the direct sum causal_conv_ref."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hippos.ops.conv as conv_module
from hippos.ops import (
    causal_conv,
    causal_conv_ref,
    fft_conv,
    next_fast_len,
    short_conv,
    short_conv_ref,
    short_conv_step,
    short_conv_step_ref,
)
from tolerances import assert_close

F64 = torch.float64
H = 3
LEADS = [(), (2,), (2, 2, 3)]  # u is (*lead, H, L): ranks 2, 3 and 5
# (L, Lk): kernel shorter than, equal to and longer than the sequence; L = 1; odd and non power-of-two sizes.
# (128, 128) and (130, 130) sit either side of causal_conv's switch from a Toeplitz matmul to the FFT.
LENGTHS = [(1, 1), (1, 6), (2, 1), (7, 3), (9, 9), (13, 40), (64, 64), (97, 20), (100, 101), (128, 128), (130, 130)]
OPS = {"fft_conv": fft_conv, "short_conv": lambda u, k, D=None: short_conv(u, k, D)[0], "causal_conv": causal_conv}


def _inputs(lead, L, Lk, with_D=True):
    u = torch.randn(*lead, H, L, dtype=F64, requires_grad=True)
    k = torch.randn(H, Lk, dtype=F64, requires_grad=True)
    D = torch.randn(H, dtype=F64, requires_grad=True) if with_D else None
    return u, k, D


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: f"lead{len(s)}")
@pytest.mark.parametrize(("L", "Lk"), LENGTHS)
def test_matches_direct_convolution(op, lead, L, Lk, compare_with_grads, nan_alloc):
    u, k, D = _inputs(lead, L, Lk)
    compare_with_grads(lambda: OPS[op](u, k, D), lambda: causal_conv_ref(u, k, D), [u, k, D])


@pytest.mark.parametrize("op", OPS)
def test_without_skip(op, compare_with_grads):
    u, k, _ = _inputs((2,), 21, 5, with_D=False)
    compare_with_grads(lambda: OPS[op](u, k), lambda: causal_conv_ref(u, k), [u, k])


def test_nan_poisoning_reaches_fft_conv(nan_alloc):
    u, k, D = _inputs((2,), 10, 4)
    before = nan_alloc.calls
    fft_conv(u, k, D).sum().backward()
    assert nan_alloc.calls - before >= 3  # forward output, grad_u and grad_k all came from the poisoned allocator


@pytest.mark.parametrize("needs", ["u", "k"])
def test_fft_conv_gradient_of_one_input(needs, nan_alloc, grads_of):
    u, k, _ = _inputs((2,), 30, 7, with_D=False)
    (u if needs == "k" else k).requires_grad_(False)
    leaf = u if needs == "u" else k
    (g_fast,) = grads_of(fft_conv(u, k), [leaf])
    (g_ref,) = grads_of(causal_conv_ref(u, k), [leaf])
    assert_close(g_fast, g_ref)


def test_fft_conv_channel_groups(monkeypatch, nan_alloc, compare_with_grads):
    """Channels processed in groups that do not divide H: every group is written, forward and backward."""
    monkeypatch.setattr(conv_module, "_channel_group", lambda n: 3)
    u = torch.randn(2, 7, 45, dtype=F64, requires_grad=True)
    k = torch.randn(7, 30, dtype=F64, requires_grad=True)
    D = torch.randn(7, dtype=F64, requires_grad=True)
    compare_with_grads(lambda: fft_conv(u, k, D), lambda: causal_conv_ref(u, k, D), [u, k, D])


def test_non_contiguous_input():
    u = torch.randn(2, 25, H, dtype=F64).transpose(-1, -2)  # (2, H, 25) view, time not contiguous
    k = torch.randn(H, 8, dtype=F64)
    expected = causal_conv_ref(u.contiguous(), k)
    assert_close(fft_conv(u, k), expected)
    assert_close(short_conv(u, k)[0], expected)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    channels=st.integers(1, 5),
    L=st.integers(1, 150),
    Lk=st.integers(1, 150),
    seed=st.integers(0, 2**16),
)
def test_property_fft_and_short_conv(lead, channels, L, Lk, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(*lead, channels, L, generator=g, dtype=F64)
    k = torch.randn(channels, Lk, generator=g, dtype=F64)
    D = torch.randn(channels, generator=g, dtype=F64)
    expected = causal_conv_ref(u, k, D)
    for op in (fft_conv, OPS["short_conv"]):
        y = op(u, k, D)
        assert y.shape == u.shape and y.dtype == u.dtype
        assert torch.isfinite(y).all()
        assert_close(y, expected)


# ---- short_conv with a window of past inputs (its state), and its step -----------------------------------


@pytest.mark.parametrize("Lk", [2, 5, 16])
@pytest.mark.parametrize("extra", [0, 3, 70])  # window exactly Lk - 1 long, or (much) longer
@pytest.mark.parametrize("L", [1, 4, 23, 150])
def test_short_conv_window_is_concatenation(Lk, extra, L, compare_with_grads):
    """Starting from a window of past inputs = convolving them together with u; both ops, their gradients."""
    u, k, D = _inputs((2,), L, Lk)
    window = torch.randn(2, H, Lk - 1 + extra, dtype=F64, requires_grad=True)
    n = window.shape[-1]

    def direct():
        return causal_conv_ref(torch.cat([window, u], dim=-1), k, D)[..., n:]

    compare_with_grads(lambda: short_conv(u, k, D, initial_state=window)[0], direct, [u, k, D, window])
    compare_with_grads(lambda: short_conv_ref(u, k, D, initial_state=window)[0], direct, [u, k, D, window])


@pytest.mark.parametrize("op", [short_conv, short_conv_ref])
@pytest.mark.parametrize("L", [1, 3, 8, 40])
@pytest.mark.parametrize("with_window", [False, True])
def test_short_conv_final_state_is_last_inputs(op, L, with_window):
    """The final state is the window after u: its last W inputs, the old window's tail in front if L < W."""
    u, k, D = _inputs((2,), L, 8)
    window = torch.randn(2, H, 8, dtype=F64) if with_window else None
    y, final = op(u, k, D, initial_state=window, output_final_state=True)
    past = window if with_window else torch.zeros(2, H, 8, dtype=F64)
    assert torch.equal(final, torch.cat([past, u.detach()], dim=-1)[..., -8:])
    assert final.is_contiguous() or op is short_conv_ref  # the fast op hands decoding a compact state
    _, none = op(u, k, D, initial_state=window)
    assert none is None


def test_short_conv_final_state_is_a_copy():
    """A state kept for decoding must not share the sequence's memory (it would keep all of it alive)."""
    u, k, _ = _inputs((2,), 8, 8)
    _, final = short_conv(u.detach(), k.detach(), output_final_state=True)
    assert final.untyped_storage().data_ptr() != u.untyped_storage().data_ptr()


def test_short_conv_window_dtypes():
    """A new window is in the compute dtype (float32 for half inputs); a given one keeps its dtype."""
    u, k = torch.randn(2, H, 5, dtype=torch.bfloat16), torch.randn(H, 3, dtype=torch.bfloat16)
    for op in (short_conv, short_conv_ref):
        y, final = op(u, k, output_final_state=True)
        assert y.dtype == torch.bfloat16 and final.dtype == torch.float32 and final.shape == (2, H, 3)
        _, final = op(u, k, initial_state=torch.zeros(2, H, 4, dtype=F64), output_final_state=True)
        assert final.dtype == F64 and final.shape == (2, H, 4)


def test_short_conv_single_tap_ignores_window():
    """Lk = 1 needs no past inputs: a given window does not change the outputs."""
    u, k, D = _inputs((2,), 6, 1)
    window = torch.randn(2, H, 3, dtype=F64)
    assert_close(short_conv(u, k, D, initial_state=window)[0], causal_conv_ref(u, k, D))


@pytest.mark.parametrize("op", [short_conv, short_conv_ref])
def test_short_conv_window_batch_mismatch(op):
    u, k, _ = _inputs((2,), 5, 6)
    with pytest.raises(ValueError, match="initial_state must be"):
        op(u, k, initial_state=torch.zeros(3, H, 5, dtype=F64))
    with pytest.raises(ValueError, match="initial_state must be"):
        op(u, k, initial_state=torch.zeros(2, H + 1, 5, dtype=F64))


@pytest.mark.parametrize("Lk", [1, 3, 8])
@pytest.mark.parametrize("extra", [0, 2])  # window exactly Lk long, or longer
@pytest.mark.parametrize("with_window", [False, True])
@pytest.mark.parametrize("step", [short_conv_step, short_conv_step_ref])
def test_short_conv_steps_match_short_conv(Lk, extra, with_window, step, run_steps):
    L = 19
    u, k, D = _inputs((2,), L, Lk)
    W = Lk + extra
    window = torch.randn(2, H, W, dtype=F64) if with_window else torch.zeros(2, H, W, dtype=F64)
    expected, expected_final = short_conv_ref(u, k, D, initial_state=window, output_final_state=True)
    y, final = run_steps(lambda u_t, s: step(u_t, s, k, D), u, window, -1)
    assert final.shape == (2, H, W)
    assert_close(y, expected)
    assert torch.equal(final, expected_final)  # the window holds the last W inputs


def test_short_conv_step_ref_needs_a_wide_enough_window():
    with pytest.raises(ValueError, match="need W >= Lk"):
        short_conv_step_ref(torch.zeros(2, H), torch.zeros(2, H, 2), torch.zeros(H, 3))


# ---- next_fast_len -----------------------------------------------------------------------------------------


def _is_smooth(m: int) -> bool:
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1


def test_next_fast_len_brute_force():
    smooth = [m for m in range(1, 4097) if _is_smooth(m)]
    for n in range(1, 2049):
        got = next_fast_len(n)
        assert got >= n and _is_smooth(got), (n, got)
        assert got == min(m for m in smooth if m >= n), (n, got)


# ---- bad arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [causal_conv_ref, fft_conv, short_conv, short_conv_ref])
def test_conv_argument_errors(op):
    u = torch.randn(2, H, 10)
    with pytest.raises(ValueError, match=r"u must be \(\.\.\., H, L\)"):
        op(torch.randn(10), torch.randn(1, 3))
    with pytest.raises(ValueError, match="kernel must be"):
        op(u, torch.randn(H + 1, 4))
    with pytest.raises(ValueError, match="kernel must be"):
        op(u, torch.randn(4))
    with pytest.raises(ValueError, match="D must be"):
        op(u, torch.randn(H, 4), torch.randn(H + 1))
    with pytest.raises(TypeError, match="floating point"):
        op(torch.ones(2, H, 10, dtype=torch.long), torch.randn(H, 4))


def test_short_conv_first_run_in_inference_mode_then_with_gradients():
    """Constants cached by an inference-mode call must still serve a later call that autograd tracks."""
    u, k = torch.randn(2, 3, 40, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        short_conv(u, k.detach())
    short_conv(u, k)[0].sum().backward()
    assert k.grad is not None
