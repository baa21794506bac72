"""Causal convolutions: fft_conv and short_conv against the direct sum causal_conv_ref."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hippos.ops.conv as conv_module
from hippos.ops import causal_conv, causal_conv_ref, fft_conv, next_fast_len, short_conv, short_conv_step

F64 = torch.float64
H = 3
LEADS = [(), (2,), (2, 2, 3)]  # u is (*lead, H, L): ranks 2, 3 and 5
# (L, Lk): kernel shorter than, equal to and longer than the sequence; L = 1; odd and non power-of-two sizes.
# (128, 128) and (130, 130) sit either side of causal_conv's switch from a Toeplitz matmul to the FFT.
LENGTHS = [(1, 1), (1, 6), (2, 1), (7, 3), (9, 9), (13, 40), (64, 64), (97, 20), (100, 101), (128, 128), (130, 130)]
OPS = {"fft_conv": fft_conv, "short_conv": short_conv, "causal_conv": causal_conv}


def _inputs(lead, L, Lk, with_D=True):
    u = torch.randn(*lead, H, L, dtype=F64, requires_grad=True)
    k = torch.randn(H, Lk, dtype=F64, requires_grad=True)
    D = torch.randn(H, dtype=F64, requires_grad=True) if with_D else None
    return u, k, D


class NaNTorch:
    """Stands in for `torch` inside hippos.ops.conv: uninitialised allocations come back full of NaN.

    A fast kernel that forgets to write part of its output then fails the comparison instead of passing
    on whatever the allocator happened to hand out.
    """

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def _poison(self, t):
        self.calls += 1
        return t.fill_(math.nan) if (t.is_floating_point() or t.is_complex()) else t

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))


@pytest.fixture
def nan_alloc(monkeypatch):
    fake = NaNTorch()
    monkeypatch.setattr(conv_module, "torch", fake)
    return fake


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
    fft_conv(u, k, D).sum().backward()
    assert nan_alloc.calls >= 3  # forward output, grad_u and grad_k all came from the poisoned allocator


@pytest.mark.parametrize("needs", ["u", "k"])
def test_fft_conv_gradient_of_one_input(needs, nan_alloc, grads_of):
    u, k, _ = _inputs((2,), 30, 7, with_D=False)
    (u if needs == "k" else k).requires_grad_(False)
    leaf = u if needs == "u" else k
    (g_fast,) = grads_of(fft_conv(u, k), [leaf])
    (g_ref,) = grads_of(causal_conv_ref(u, k), [leaf])
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


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
    torch.testing.assert_close(fft_conv(u, k), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(short_conv(u, k), expected, rtol=1e-10, atol=1e-12)


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
    for op in (fft_conv, short_conv):
        y = op(u, k, D)
        assert y.shape == u.shape and y.dtype == u.dtype
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-11)


# ---- short_conv with history, and its step ---------------------------------------------------------------


@pytest.mark.parametrize("Lk", [2, 5, 16])
@pytest.mark.parametrize("extra", [0, 3, 70])  # history exactly Lk - 1 long, or (much) longer
@pytest.mark.parametrize("L", [1, 4, 23, 150])
def test_short_conv_history_is_concatenation(Lk, extra, L, compare_with_grads):
    u, k, D = _inputs((2,), L, Lk)
    hist = torch.randn(2, H, Lk - 1 + extra, dtype=F64, requires_grad=True)
    n = hist.shape[-1]

    def ref():
        return causal_conv_ref(torch.cat([hist, u], dim=-1), k, D)[..., n:]

    compare_with_grads(lambda: short_conv(u, k, D, history=hist), ref, [u, k, D, hist])


def test_short_conv_history_single_tap():
    """Lk = 1 needs no history at all; a given history (even an empty slice of it) must simply be ignored."""
    u, k, D = _inputs((2,), 6, 1)
    hist = torch.randn(2, H, 3, dtype=F64)
    expected = causal_conv_ref(u, k, D)
    torch.testing.assert_close(short_conv(u, k, D, history=hist), expected, rtol=1e-10, atol=1e-12)


def test_short_conv_history_batch_mismatch():
    u, k, _ = _inputs((2,), 5, 6)
    with pytest.raises(ValueError, match="history must be"):
        short_conv(u, k, history=torch.zeros(3, H, 5, dtype=F64))
    with pytest.raises(ValueError, match="history must be"):
        short_conv(u, k, history=torch.zeros(2, H + 1, 5, dtype=F64))


@pytest.mark.parametrize("Lk", [1, 3, 8])
@pytest.mark.parametrize("extra", [0, 2])  # window exactly Lk long, or longer
@pytest.mark.parametrize("with_history", [False, True])
def test_short_conv_step_matches_short_conv(Lk, extra, with_history):
    L = 19
    u, k, D = _inputs((2,), L, Lk)
    W = Lk + extra
    window = torch.randn(2, H, W, dtype=F64) if with_history else torch.zeros(2, H, W, dtype=F64)
    expected = short_conv(u, k, D)
    if with_history:  # starting from a window of past inputs = convolving them together with u
        expected = causal_conv_ref(torch.cat([window, u], dim=-1), k, D)[..., W:]
    ys = []
    for t in range(L):
        y_t, window = short_conv_step(u[..., t], window, k, D)
        assert window.shape == (2, H, W)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, dim=-1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(window, u[..., L - W :].detach())  # the window holds the last W inputs


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


@pytest.mark.parametrize("op", [causal_conv_ref, fft_conv, short_conv])
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
    short_conv(u, k).sum().backward()
    assert k.grad is not None
