"""The chunked LM head + cross-entropy equals its definition: loss and both gradients."""

import pytest
import torch

from hippos.ops import linear_cross_entropy, linear_cross_entropy_ref
from hippos.ops import loss as loss_module
from tolerances import assert_close


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows for a vocabulary of 11, so that 10 rows make 4 chunks, the last one short."""
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 3 * 4 * 11 + 1)


def _inputs(dtype=torch.float64, n=10, d=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    return h, W, labels


def _loss_and_grads(fn, h, W, labels, scale=1.0):
    loss = fn(h, W, labels)
    gh, gW = torch.autograd.grad(loss * scale, (h, W))
    return loss, gh, gW


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_equals_reference_in_float64(small_chunks, scale):
    h, W, labels = _inputs()
    ours = _loss_and_grads(linear_cross_entropy, h, W, labels, scale)
    ref = _loss_and_grads(linear_cross_entropy_ref, h, W, labels, scale)
    assert ours[0].dtype == torch.float64
    for a, b in zip(ours, ref):
        assert_close(a, b, strict=True)


def test_float32_close_and_one_chunk_or_many_agree(monkeypatch):
    h, W, labels = _inputs(torch.float32, n=37, d=16, v=50)
    whole = _loss_and_grads(linear_cross_entropy, h, W, labels)
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 5 * 4 * 50 + 1)
    chunked = _loss_and_grads(linear_cross_entropy, h, W, labels)
    ref = _loss_and_grads(linear_cross_entropy_ref, h, W, labels)
    for a, b, c in zip(whole, chunked, ref):
        assert_close(a, c, strict=True, scale=10)  # 37 rows, summed by chunks
        assert_close(b, c, strict=True, scale=10)


def test_gradient_for_one_input_only(small_chunks):
    h, W, labels = _inputs()
    W_frozen = W.detach()
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, W_frozen, labels), (h,))
    (gh_ref,) = torch.autograd.grad(linear_cross_entropy_ref(h, W_frozen, labels), (h,))
    assert_close(gh, gh_ref, strict=True)
    with torch.no_grad():
        assert_close(linear_cross_entropy(h, W, labels), linear_cross_entropy_ref(h, W, labels), strict=True)


def test_accumulates_like_any_loss(small_chunks):
    """Two backward passes into the same leaves add up, as with the reference."""
    h, W, labels = _inputs()
    for _ in range(2):
        linear_cross_entropy(h, W, labels).backward()
    ours = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    for _ in range(2):
        linear_cross_entropy_ref(h, W, labels).backward()
    assert_close(ours[0], h.grad, strict=True)
    assert_close(ours[1], W.grad, strict=True)


def test_under_autocast_follows_the_reference():
    h, W, labels = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = linear_cross_entropy(h, W, labels), linear_cross_entropy_ref(h, W, labels)
    assert ours.dtype == ref.dtype == torch.float32
    assert_close(ours, ref, strict=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, W, y: (h[:, :-1], W, y), "same D"),
        (lambda h, W, y: (h, W, y[:-1]), "labels must be int64"),
        (lambda h, W, y: (h, W, y.int()), "labels must be int64"),
        (lambda h, W, y: (h, W, torch.full_like(y, 11)), r"labels must lie in \[0, 11\)"),
        (lambda h, W, y: (h, W, torch.full_like(y, -100)), r"labels must lie in"),
        (lambda h, W, y: (h[:0], W, y[:0]), "no labels"),
    ],
)
def test_bad_input_is_refused(change, message):
    h, W, labels = _inputs()
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*change(h, W, labels))


def test_second_backward_through_a_retained_graph_is_refused():
    h, W, labels = _inputs()
    loss = linear_cross_entropy(h, W, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()
