"""Causal multi-head attention: written-out reference, parallel vs KV-cache steps, prefill in pieces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hippos.layers import MultiHeadAttention
from tolerances import assert_close

F64 = torch.float64
D_MODEL, N_HEAD = 16, 4  # head size 4
ROTARY = [0, 2, 4]


def _attention(rotary_dim=0):
    return MultiHeadAttention(D_MODEL, N_HEAD, rotary_dim=rotary_dim).double()


def attention_reference(m: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out; fused Wqkv rows: all Q heads, all K heads, all V heads (docs/models.md)."""
    B, L, D = x.shape
    nh, hd = m.n_head, m.head_dim
    q, k, v = F.linear(x, m.Wqkv.weight, m.Wqkv.bias).split(D, dim=-1)
    q, k, v = (t.reshape(B, L, nh, hd).transpose(1, 2) for t in (q, k, v))  # head j: features j*hd ..
    rd = m.rotary_emb.dim if m.rotary_emb is not None else 0
    if rd:  # GPT-NeoX: feature i of the first half pairs with feature i + rd/2
        half = rd // 2
        inv_freq = 1.0 / 10000 ** (torch.arange(half, dtype=F64) * 2 / rd)
        angle = torch.arange(L, dtype=F64)[:, None] * inv_freq
        cos, sin = angle.cos(), angle.sin()

        def rotate(t):
            a, b = t[..., :half], t[..., half:rd]
            return torch.cat([a * cos - b * sin, b * cos + a * sin, t[..., rd:]], dim=-1)

        q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, -math.inf).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(B, L, D)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("rotary_dim", ROTARY)
def test_matches_written_out_attention(rotary_dim):
    layer = _attention(rotary_dim)
    x = torch.randn(2, 33, D_MODEL, dtype=F64)
    with torch.no_grad():
        assert_close(layer(x)[0], attention_reference(layer, x))


def test_rotary_changes_the_output():
    plain, rotary = _attention(0), _attention(4)
    rotary.load_state_dict(plain.state_dict())
    x = torch.randn(1, 10, D_MODEL, dtype=F64)
    with torch.no_grad():
        assert not torch.allclose(plain(x)[0][:, 1:], rotary(x)[0][:, 1:], atol=1e-3)
        assert_close(plain(x)[0][:, 0], rotary(x)[0][:, 0])  # position 0: no rotation


@pytest.mark.parametrize("rotary_dim", ROTARY)
def test_parallel_equals_steps(rotary_dim, run_steps):
    layer = _attention(rotary_dim)
    x = torch.randn(2, 37, D_MODEL, dtype=F64)
    with torch.no_grad():
        y, _ = layer(x)
        # capacity 5 < 37: the cache has to grow several times on the way
        y_steps, cache = run_steps(layer, x, layer.init_state(2, capacity=5))
    assert_close(y_steps, y)
    assert cache.end == 37


@pytest.mark.parametrize("rotary_dim", ROTARY)
@pytest.mark.parametrize("sizes", [(8, 16, 13), (5, 11, 1, 20), (37,)])
def test_chunked_prefill(sizes, rotary_dim):
    layer = _attention(rotary_dim)
    x = torch.randn(2, 37, D_MODEL, dtype=F64)
    with torch.no_grad():
        y_one, cache_one = layer(x, return_state=True)
        ys, cache = [], None
        for piece in torch.split(x, list(sizes), dim=1):
            y, cache = layer(piece, cache, return_state=True)
            ys.append(y)
    assert_close(torch.cat(ys, 1), y_one)
    assert cache.end == cache_one.end == 37
    assert_close(cache.keys(), cache_one.keys())
    assert_close(cache.values(), cache_one.values())


@pytest.mark.parametrize("rotary_dim", ROTARY)
def test_prompt_then_steps(rotary_dim, run_steps):
    layer = _attention(rotary_dim)
    x = torch.randn(3, 30, D_MODEL, dtype=F64)
    with torch.no_grad():
        y_full, _ = layer(x)
        y_prompt, cache = layer(x[:, :19], return_state=True)
        y_rest, _ = run_steps(layer, x[:, 19:], cache)
    assert_close(torch.cat([y_prompt, y_rest], 1), y_full)


def test_forward_from_empty_cache():
    layer = _attention(2)
    x = torch.randn(2, 9, D_MODEL, dtype=F64)
    with torch.no_grad():
        y, cache = layer(x, layer.init_state(2), return_state=True)
        assert_close(y, layer(x)[0])
    assert cache.end == 9


def test_gradient_through_steps_equals_parallel(grads_of, run_steps):
    """Backpropagating through a KV-cache decode gives the parallel pass's gradients."""
    layer = _attention(2)
    x = torch.randn(2, 6, D_MODEL, dtype=F64, requires_grad=True)
    inputs = [x, *layer.parameters()]
    g_par = grads_of(layer(x)[0], inputs)
    g_step = grads_of(run_steps(layer, x, layer.init_state(2))[0], inputs)
    for a, b in zip(g_step, g_par, strict=True):
        assert_close(a, b)


def test_saved_state_can_be_reused(run_steps):
    """Continuing twice from the same state (two branches) must not change what the first branch sees."""
    layer = _attention(2)
    x = torch.randn(1, 6, D_MODEL, dtype=F64)
    other = torch.randn(1, D_MODEL, dtype=F64)
    with torch.no_grad():
        y_full, _ = layer(x)
        _, saved = run_steps(layer, x[:, :4], layer.init_state(1))
        _, branch_a = layer.step(x[:, 4], saved)
        layer.step(other, saved)  # a second continuation of the saved state
        y_a, _ = layer.step(x[:, 5], branch_a)
    assert_close(y_a, y_full[:, 5])
