"""Bad input gets a clear error that names the problem, before any work is done."""

from __future__ import annotations

import pytest
import torch

from hippos.layers import H3, S4D, DiagonalSSM, MultiHeadAttention, ShiftSSM

D = 16


def _mixers():
    return {
        "h3": H3(D, d_state=8),
        "h3-multihead": H3(D, d_state=8, head_dim=4),
        "s4d": S4D(D, d_state=8),
        "attention": MultiHeadAttention(D, n_head=4),
    }


MIXERS = list(_mixers())


@pytest.fixture(params=MIXERS)
def mixer(request):
    return _mixers()[request.param]


def test_wrong_rank(mixer):
    with pytest.raises(ValueError, match=r"must be \(batch, length, 16\), got shape \(5, 16\)"):
        mixer(torch.randn(5, D))
    with pytest.raises(ValueError, match=r"must be \(batch, length, 16\)"):
        mixer(torch.randn(1, 2, 5, D))


def test_wrong_width(mixer):
    with pytest.raises(ValueError, match="width 12 but the layer expects d_model = 16"):
        mixer(torch.randn(2, 5, 12))


def test_integer_input(mixer):
    with pytest.raises(TypeError, match="must be floating point, got torch.int64"):
        mixer(torch.ones(2, 5, D, dtype=torch.long))


def test_empty_sequence(mixer):
    with pytest.raises(ValueError, match="empty sequence"):
        mixer(torch.randn(2, 0, D))


def test_step_wrong_shape(mixer):
    state = mixer.init_state(2)
    with pytest.raises(ValueError, match=r"must be \(batch, 16\) for one step"):
        mixer.step(torch.randn(2, 1, D), state)
    with pytest.raises(ValueError, match=r"must be \(batch, 16\) for one step"):
        mixer.step(torch.randn(2, D + 1), state)
    with pytest.raises(TypeError, match="must be floating point"):
        mixer.step(torch.ones(2, D, dtype=torch.int32), state)


@pytest.mark.parametrize("name", MIXERS)
def test_state_of_wrong_batch(name):
    mixer = _mixers()[name]
    state = mixer.init_state(3)
    with pytest.raises(ValueError, match="expected .*build it with init_state"):
        mixer(torch.randn(2, 5, D), state)
    with pytest.raises(ValueError, match="expected .*build it with init_state"):
        mixer.step(torch.randn(2, D), state)


def test_state_of_other_layer_size():
    state = H3(D, d_state=4).init_state(2)  # right batch, wrong d_state
    with pytest.raises(ValueError, match="shift SSM state has shape"):
        H3(D, d_state=8)(torch.randn(2, 5, D), state)


def test_ssm_state_shapes():
    diag, shift = DiagonalSSM(4, 8), ShiftSSM(4, 8)
    u = torch.randn(2, 4, 10)
    with pytest.raises(ValueError, match=r"diagonal SSM state has shape \(2, 4, 3\), expected \(2, 4, 4\)"):
        diag(u, torch.zeros(2, 4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="diagonal SSM state has shape"):
        diag.step(u[..., 0], torch.zeros(3, 4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"shift SSM state has shape \(2, 4, 7\), expected \(2, 4, 8\)"):
        shift(u, torch.zeros(2, 4, 7))
    with pytest.raises(ValueError, match="shift SSM state has shape"):
        shift.step(u[..., 0], torch.zeros(2, 5, 8))


def test_head_dim_must_divide():
    with pytest.raises(ValueError, match="head_dim 3 must divide d_model 16"):
        H3(D, head_dim=3)
    with pytest.raises(ValueError, match="head_dim 0 must divide"):
        H3(D, head_dim=0)


@pytest.mark.parametrize("d_state", [7, 1, 0])
def test_d_state_must_be_even(d_state):
    with pytest.raises(ValueError, match="d_state must be even"):
        H3(D, d_state=d_state)
    with pytest.raises(ValueError, match="d_state must be even"):
        S4D(D, d_state=d_state)


@pytest.mark.parametrize("cls", [H3, S4D])
def test_unknown_options(cls):
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        cls(D, d_state=8, mode="fast")
    with pytest.raises(ValueError, match="unknown S4D init 'legs'"):
        cls(D, d_state=8, ssm_init="legs")
    with pytest.raises(ValueError, match="unknown discretization 'euler'"):
        cls(D, d_state=8, discretization="euler")
    with pytest.raises(ValueError, match="need 0 < dt_min <= dt_max"):
        cls(D, d_state=8, dt_min=0.1, dt_max=0.01)


def test_attention_configuration():
    with pytest.raises(ValueError, match="n_head 5 must divide d_model 16"):
        MultiHeadAttention(D, 5)
    with pytest.raises(ValueError, match="rotary_dim 8 exceeds the head size 4"):
        MultiHeadAttention(D, 4, rotary_dim=8)
    with pytest.raises(ValueError, match="rotary dim must be even"):
        MultiHeadAttention(D, 4, rotary_dim=3)
