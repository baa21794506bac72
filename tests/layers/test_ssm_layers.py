"""ShiftSSM, DiagonalSSM and S4D: parallel vs recurrent, state passing, modes, initialisation."""

from __future__ import annotations

import math

import pytest
import torch

import hippos.layers.diagonal_ssm as diagonal_ssm_module
from hippos.layers import S4D, DiagonalSSM, ShiftSSM
from hippos.ops import shift_step_ref, ssm_A
from tolerances import assert_close

F64 = torch.float64
MODES = ["fft", "chunked", "auto"]


def _pieces(x: torch.Tensor, sizes, dim: int):
    assert sum(sizes) == x.shape[dim]
    return torch.split(x, list(sizes), dim=dim)


def _run_in_pieces(layer, x, sizes, dim, **kwargs):
    """Forward over consecutive pieces, handing the returned state to the next one."""
    ys, state = [], None
    for piece in _pieces(x, sizes, dim):
        y, state = layer(piece, state, return_state=True, **kwargs)
        ys.append(y)
    return torch.cat(ys, dim=dim), state


def _randomised_shift(H=6, N=8):
    layer = ShiftSSM(H, N).double()
    with torch.no_grad():
        layer.B.copy_(torch.randn(H, N))  # a trained B is not e_1
    return layer


# ---- ShiftSSM ---------------------------------------------------------------------------------------------


def test_shift_parallel_equals_steps(run_steps):
    layer = _randomised_shift()
    u = torch.randn(2, 6, 29, dtype=F64)
    skip = torch.randn(6, dtype=F64)
    y, state = layer(u, return_state=True, skip=skip)
    y_steps, state_steps = run_steps(lambda u_t, s: layer.step(u_t, s, skip=skip), u, layer.init_state(2), -1)
    assert_close(y_steps, y)
    assert_close(state_steps, state)


def test_shift_layer_matches_true_recurrence():
    """The layer's shift-register realisation gives the outputs of the SSM as defined (any B)."""
    layer = _randomised_shift()
    u = torch.randn(2, 6, 21, dtype=F64)
    x = torch.zeros(2, 6, 8, dtype=F64)
    ys = []
    for t in range(u.shape[-1]):
        y_t, x = shift_step_ref(u[..., t], x, layer.B, layer.C)
        ys.append(y_t)
    assert_close(layer(u)[0], torch.stack(ys, -1))


@pytest.mark.parametrize("sizes", [(29,), (8, 8, 13), (1, 5, 23), (3, 26)])
def test_shift_state_passing(sizes):
    layer = _randomised_shift()
    u = torch.randn(2, 3, 6, 29, dtype=F64)
    y_one, state_one = layer(u, return_state=True)
    y, state = _run_in_pieces(layer, u, sizes, -1)
    assert_close(y, y_one)
    assert_close(state, state_one)
    assert torch.equal(state, u[..., -8:])  # the state is the last N inputs, copied


# ---- DiagonalSSM -------------------------------------------------------------------------------------------


def _diag(mode="auto", discretization="bilinear", chunk=8, H=4, N=8):
    return DiagonalSSM(H, N, discretization=discretization, mode=mode, chunk=chunk, dt_max=0.5).double()


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(2,), (2, 3)], ids=["rank3", "rank4"])
def test_diagonal_parallel_equals_steps(mode, discretization, lead, run_steps):
    layer = _diag(mode, discretization)
    u = torch.randn(*lead, 4, 37, dtype=F64)
    skip = torch.randn(4, dtype=F64)
    y, state = layer(u, return_state=True, skip=skip)
    y_steps, state_steps = run_steps(lambda u_t, s: layer.step(u_t, s, skip=skip), u, layer.init_state(lead), -1)
    assert state.dtype == torch.complex128 and state.shape == (*lead, 4, 4)
    assert_close(y_steps, y)
    assert_close(state_steps, state)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [(8, 16, 13), (5, 11, 1, 20), (37,)])
def test_diagonal_state_passing(mode, sizes):
    layer = _diag(mode)
    u = torch.randn(2, 4, 37, dtype=F64)
    y_one, state_one = layer(u, return_state=True)
    y, state = _run_in_pieces(layer, u, sizes, -1)
    assert_close(y, y_one)
    assert_close(state, state_one)


def test_diagonal_modes_agree_with_gradients(grads_of):
    u = torch.randn(2, 4, 45, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 4, 4, dtype=torch.complex128)
    skip = torch.randn(4, dtype=F64)
    results = {}
    for mode in MODES:
        torch.manual_seed(1)
        layer = _diag(mode)
        out = layer(u, h0, return_state=True, skip=skip)
        results[mode] = (out, grads_of(out, [u, *layer.parameters()]))
    for mode in ("chunked", "auto"):
        for a, b in zip(results[mode][0] + results[mode][1], results["fft"][0] + results["fft"][1], strict=True):
            assert_close(a, b)


def test_auto_mode_switches_to_chunked(monkeypatch):
    monkeypatch.setattr(diagonal_ssm_module, "AUTO_CHUNKED_FROM", 16)
    layer = _diag("auto")
    assert layer.resolve_mode(15) == "fft"
    assert layer.resolve_mode(16) == "chunked"
    assert _diag("fft").resolve_mode(10**6) == "fft"
    assert _diag("chunked").resolve_mode(1) == "chunked"
    reference = _diag("fft")
    reference.load_state_dict(layer.state_dict())
    u = torch.randn(2, 4, 30, dtype=F64)
    for a, b in zip(layer(u, return_state=True), reference(u, return_state=True), strict=True):
        assert_close(a, b)


# ---- S4D ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_s4d_parallel_steps_and_prefill(mode, run_steps):
    layer = S4D(8, d_state=8, mode=mode, chunk=8, dt_max=0.5).double()
    x = torch.randn(2, 30, 8, dtype=F64)
    y, state = layer(x, return_state=True)
    y_steps, state_steps = run_steps(layer, x, layer.init_state(2))
    assert_close(y_steps, y)
    assert_close(state_steps.diag, state.diag)
    y_pieces, state_pieces = _run_in_pieces(layer, x, (8, 3, 19), 1)
    assert_close(y_pieces, y)
    assert_close(state_pieces.diag, state.diag)
    y_prompt, s = layer(x[:, :17], return_state=True)
    y_rest, _ = run_steps(layer, x[:, 17:], s)
    assert_close(torch.cat([y_prompt, y_rest], 1), y)


# ---- initialisation ----------------------------------------------------------------------------------------


def test_s4d_lin_init():
    layer = DiagonalSSM(64, d_state=16, init="lin", dtype=F64)
    A = ssm_A(layer.inv_A_real, layer.A_imag).detach()
    n = torch.arange(8, dtype=F64)
    expected = torch.complex(torch.full((64, 8), -0.5, dtype=F64), (math.pi * n).expand(64, 8))
    assert_close(A, expected, strict=True, scale=0.01)  # the formula itself, up to one rounding of exp(log 0.5)


def test_s4d_inv_init():
    N = 16
    layer = DiagonalSSM(5, d_state=N, init="inv", dtype=F64)
    n = torch.arange(N // 2, dtype=F64)
    expected = (N / math.pi) * (N / (1 + 2 * n) - 1)
    assert_close(layer.A_imag.detach(), expected.expand(5, N // 2), strict=True)
    A = ssm_A(layer.inv_A_real, layer.A_imag).detach()
    assert_close(A.real, torch.full_like(A.real, -0.5), strict=True, scale=0.01)  # up to one rounding of exp


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_B_C_dt_init(init):
    dt_min, dt_max = 2e-3, 5e-2
    layer = DiagonalSSM(512, d_state=8, init=init, dt_min=dt_min, dt_max=dt_max, dtype=F64)
    B = torch.view_as_complex(layer.B.detach())
    assert torch.equal(B, torch.ones_like(B))
    dt = layer.log_dt.detach().exp()
    assert dt.min() >= dt_min * (1 - 1e-12) and dt.max() <= dt_max * (1 + 1e-12)
    # log-uniform: both ends of the range are reached, and the median sits near the geometric mean
    assert dt.min() < 1.2 * dt_min and dt.max() > dt_max / 1.2
    assert abs(dt.log().median().item() - 0.5 * (math.log(dt_min) + math.log(dt_max))) < 0.3
    C = layer.C.detach()
    assert abs(C.mean().item()) < 0.05
    assert 0.6 < C.std().item() < 0.82  # complex normal: each part has variance 1/2


def test_shift_init():
    layer = ShiftSSM(32, d_state=16)
    e1 = torch.zeros(32, 16)
    e1[:, 0] = 1.0
    assert torch.equal(layer.B.detach(), e1)
    bound = 1 / math.sqrt(16)
    assert layer.C.abs().max() <= bound
    assert layer.C.abs().max() > 0.8 * bound  # uniform over the whole range, not a narrower one
    assert_close(layer.kernel().detach(), layer.C.detach(), strict=True)


def test_ssm_parameter_names():
    """The SSM optimiser group (no weight decay, lr at most 1e-3) is named by the classes, not marked on tensors."""
    assert ShiftSSM.ssm_parameter_names == ("B",)
    assert DiagonalSSM.ssm_parameter_names == ("log_dt", "inv_A_real", "A_imag", "B")
    for layer in (DiagonalSSM(4, 8), ShiftSSM(4, 8)):
        params = dict(layer.named_parameters())
        assert set(layer.ssm_parameter_names) < set(params)  # real parameters, and C stays an ordinary weight
        assert "C" not in layer.ssm_parameter_names
        assert not any(hasattr(p, "_optim") for p in params.values())
