"""Every SSM op of the ops contract against its reference: outputs, final states and every gradient.

    y, final_state = op(u, <params...>, D, initial_state, output_final_state)
    y_t, state = op_step(u_t, state, <params...>, D, in_place=False)  # True: written into state itself

For each fast op (short_conv, diag_ssm_fft, diag_ssm_chunked) and each fast step (short_conv_step,
diag_ssm_step), in float64: with and without an initial state, with the final state asked for or not, lengths
1, odd and not powers of two (and past causal_conv's switch to the FFT at 128), batch shapes () and (2, 3);
gradients wrt u, every parameter, D and the initial state. Two pieces with the state handed from one to the
next, by any mix of the ops, equal one pass; the steps over a sequence equal the op. Every buffer the ops
allocate uninitialised starts as NaN here (tests/ops/conftest.py), so an unwritten element fails.
"""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch

from hippos.ops import (
    diag_ssm_chunked,
    diag_ssm_fft,
    diag_ssm_ref,
    diag_ssm_step,
    diag_ssm_step_ref,
    short_conv,
    short_conv_ref,
    short_conv_step,
    short_conv_step_ref,
    step_output_weights,
)
from tolerances import assert_close

F64 = torch.float64
H, M, TAPS = 3, 4, 5  # channels; complex modes of the diagonal SSM; taps of the shift SSM's filter
CHUNK = 4  # small, so that every tested length spans several chunks, most with a partial last one
LEADS = {"batch()": (), "batch(2,3)": (2, 3)}
# 130 steps: past causal_conv's switch from a Toeplitz matmul to the FFT at 128 (one such case stays in the fast run).
LENGTHS = [1, 7, 24, 37, pytest.param(130, marks=pytest.mark.slow)]


class ShiftSystem:
    """The shift SSM as the ops run it: a filter k (H, TAPS); its state a window of the last TAPS inputs."""

    ref = staticmethod(short_conv_ref)
    ops = {"short_conv": short_conv}
    step_ref = staticmethod(short_conv_step_ref)
    steps = {
        "short_conv_step": short_conv_step,
        "short_conv_step(flipped)": lambda u_t, s, k, D: short_conv_step(u_t, s, k, D, flipped=k.flip(-1)),
    }

    def __init__(self, s4d_params):
        self.k = torch.randn(H, TAPS, dtype=F64, requires_grad=True)

    def leaves(self) -> list[torch.Tensor]:
        return [self.k]

    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.k,)

    def state_leaf(self, lead) -> torch.Tensor:
        return torch.randn(*lead, H, TAPS, dtype=F64, requires_grad=True)

    @staticmethod
    def state(leaf):
        return leaf


class DiagSystem:
    """The diagonal SSM: (dA, dB, C) from float64 S4D parameters; its state (..., H, M) complex."""

    ref = staticmethod(diag_ssm_ref)
    ops = {
        "diag_ssm_fft": partial(diag_ssm_fft, chunk=CHUNK),
        "diag_ssm_chunked": partial(diag_ssm_chunked, chunk=CHUNK),
    }
    step_ref = staticmethod(diag_ssm_step_ref)
    steps = {
        "diag_ssm_step": diag_ssm_step,
        "diag_ssm_step(out_weights)": lambda u_t, s, dA, dB, C, D: diag_ssm_step(
            u_t, s, dA, dB, C, D, out_weights=step_output_weights(C)
        ),
    }

    def __init__(self, s4d_params):
        self.p = s4d_params(H, M)

    def leaves(self) -> list[torch.Tensor]:
        return self.p.leaves()

    def params(self) -> tuple[torch.Tensor, ...]:
        return self.p.discrete()  # rebuilt on every call, so that each call has its own graph to the leaves

    def state_leaf(self, lead) -> torch.Tensor:
        # A real leaf (..., H, M, 2) seen as complex, so that its gradient is a plain real tensor.
        return torch.randn(*lead, H, M, 2, dtype=F64, requires_grad=True)

    @staticmethod
    def state(leaf):
        return None if leaf is None else torch.view_as_complex(leaf)


SYSTEMS = {"shift": ShiftSystem, "diag": DiagSystem}
FAST = [(name, op) for name, system in SYSTEMS.items() for op in system.ops]
STEPS = [(name, step) for name, system in SYSTEMS.items() for step in system.steps]


def _call(fn, u, system, D, state_leaf, final):
    """fn under the contract: y alone when no final state is asked for (and then it must be None)."""
    y, h = fn(u, *system.params(), D, system.state(state_leaf), final)
    assert y.shape == u.shape and y.dtype == u.dtype
    if not final:
        assert h is None, "the final state is computed only when asked for"
        return y
    return y, h


@pytest.mark.parametrize("final", [False, True], ids=["no-final-state", "final-state"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize(("system_name", "op"), FAST, ids=[op for _, op in FAST])
def test_fast_op_matches_reference(system_name, op, L, lead, with_state, final, s4d_params, compare_with_grads):
    system = SYSTEMS[system_name](s4d_params)
    u = torch.randn(*lead, H, L, dtype=F64, requires_grad=True)
    D = torch.randn(H, dtype=F64, requires_grad=True)
    s0 = system.state_leaf(lead) if with_state else None
    inputs = [u, D, *system.leaves()] + ([s0] if with_state else [])
    compare_with_grads(
        lambda: _call(system.ops[op], u, system, D, s0, final),
        lambda: _call(system.ref, u, system, D, s0, final),
        inputs,
    )


def test_fft_mode_past_the_toeplitz_switch(s4d_params, compare_with_grads):
    """The one length-130 case of the fast run: diag_ssm_fft through fft_conv, from a state, to a state."""
    system = DiagSystem(s4d_params)
    u = torch.randn(H, 130, dtype=F64, requires_grad=True)
    D = torch.randn(H, dtype=F64, requires_grad=True)
    s0 = system.state_leaf(())
    fast, ref = system.ops["diag_ssm_fft"], system.ref
    inputs = [u, D, s0, *system.leaves()]
    compare_with_grads(lambda: _call(fast, u, system, D, s0, True), lambda: _call(ref, u, system, D, s0, True), inputs)


def _pieces_then_one_pass(system_name, ops, L, cut, s4d_params):
    """(run in two pieces by ops[0] then ops[1], one pass of the reference), both from one initial state."""
    system = SYSTEMS[system_name](s4d_params)
    u = torch.randn(2, H, L, dtype=F64, requires_grad=True)
    D = torch.randn(H, dtype=F64, requires_grad=True)
    s0 = system.state_leaf((2,))
    first, second = (system.ref if op == "ref" else system.ops[op] for op in ops)

    def pieces():
        y1, h = first(u[..., :cut], *system.params(), D, system.state(s0), True)
        y2, h = second(u[..., cut:], *system.params(), D, h, True)
        return torch.cat([y1, y2], dim=-1), h

    def one_pass():
        return system.ref(u, *system.params(), D, system.state(s0), True)

    return pieces, one_pass, [u, D, s0, *system.leaves()]


PAIRS = [(name, pair) for name, system in SYSTEMS.items() for pair in itertools.product(["ref", *system.ops], repeat=2)]


@pytest.mark.parametrize(("L", "cut"), [(37, 16), (9, 1), (30, 29), (24, 12)])
@pytest.mark.parametrize(("system_name", "ops"), PAIRS, ids=[f"{a}-then-{b}" for _, (a, b) in PAIRS])
def test_state_passed_between_pieces_equals_one_pass(system_name, ops, L, cut, s4d_params, compare_with_grads):
    pieces, one_pass, inputs = _pieces_then_one_pass(system_name, ops, L, cut, s4d_params)
    compare_with_grads(pieces, one_pass, inputs)


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("with_D", [False, True], ids=["no-D", "D"])
@pytest.mark.parametrize(("system_name", "step"), STEPS, ids=[step for _, step in STEPS])
def test_fast_step_matches_reference_step(system_name, step, with_D, lead, s4d_params, compare_with_grads):
    system = SYSTEMS[system_name](s4d_params)
    u_t = torch.randn(*lead, H, dtype=F64, requires_grad=True)
    s0 = system.state_leaf(lead)
    D = torch.randn(H, dtype=F64, requires_grad=True) if with_D else None
    inputs = [u_t, s0, *system.leaves()] + ([D] if with_D else [])

    def run(fn):
        return lambda: fn(u_t, system.state(s0), *system.params(), D)

    compare_with_grads(run(system.steps[step]), run(system.step_ref), inputs)


@pytest.mark.parametrize("L", [1, 23])
@pytest.mark.parametrize(("system_name", "step"), STEPS + [(name, "ref") for name in SYSTEMS])
def test_steps_over_a_sequence_equal_the_op(system_name, step, L, s4d_params, run_steps):
    """Prompt-free decoding: the steps from an initial state give the outputs and final state of the op."""
    system = SYSTEMS[system_name](s4d_params)
    fn = system.step_ref if step == "ref" else system.steps[step]
    u = torch.randn(2, H, L, dtype=F64)
    D = torch.randn(H, dtype=F64)
    s0 = system.state(system.state_leaf((2,)).detach())
    with torch.no_grad():
        params = system.params()
        y, h = run_steps(lambda u_t, s: fn(u_t, s, *params, D), u, s0, -1)
        y_ref, h_ref = system.ref(u, *params, D, s0, True)
    assert_close(y, y_ref)
    assert_close(h, h_ref)


IN_PLACE = {
    "short_conv_step": ("shift", short_conv_step),
    "short_conv_step_ref": ("shift", short_conv_step_ref),
    "diag_ssm_step": ("diag", diag_ssm_step),
    "diag_ssm_step_ref": ("diag", diag_ssm_step_ref),
}


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("name", IN_PLACE)
def test_in_place_steps_write_the_same_state_into_their_own(name, lead, s4d_params):
    """in_place=True returns the state it was given, holding exactly what the step returns otherwise."""
    system_name, step = IN_PLACE[name]
    system = SYSTEMS[system_name](s4d_params)
    with torch.no_grad():
        params, D = system.params(), torch.randn(H, dtype=F64)
        state = system.state(system.state_leaf(lead)).clone()
        u_t = torch.randn(*lead, H, dtype=F64)
        y, expected = step(u_t, state, *params, D)
        owned = state.clone()
        y_in_place, returned = step(u_t, owned, *params, D, in_place=True)
    assert returned is owned and torch.equal(owned, expected) and torch.equal(y_in_place, y)
    assert not torch.equal(state, expected)  # the step did change the state: the check above means something
