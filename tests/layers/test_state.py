"""The mixer state protocol: select, concat, to, to/from tensors, and rows at different positions in one batch."""

from __future__ import annotations

import pytest
import torch

from hippos.layers import H3, S4D, STATE_TYPES, AttentionState, H3State, MultiHeadAttention, S4DState, state_type
from tolerances import assert_close

F64 = torch.float64
D = 16


def _mixer(name: str):
    torch.manual_seed(0)
    mixers = {
        "h3": lambda: H3(D, 8, dt_max=0.5),
        "h3-head2": lambda: H3(D, 8, head_dim=2, dt_max=0.5),
        "s4d": lambda: S4D(D, 8, dt_max=0.5),
        "attention": lambda: MultiHeadAttention(D, 4),
        "rotary-attention": lambda: MultiHeadAttention(D, 4, rotary_dim=4),
    }
    return mixers[name]().double()


MIXERS = ["h3", "h3-head2", "s4d", "attention", "rotary-attention"]


def _steps(mixer, xs: torch.Tensor, state):
    """Step through xs (B, n, D); returns (outputs (B, n, D), state)."""
    ys = []
    for t in range(xs.shape[1]):
        y, state = mixer.step(xs[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def _assert_same_state(a, b):
    assert type(a) is type(b)
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert_close(ta[name], tb[name], strict=True, msg=name)


@pytest.mark.parametrize("name", MIXERS)
def test_rows_of_different_lengths_joined_step_as_each_alone(name):
    """Prompts of lengths 7, 3 and 5 run apart, their states joined, then stepped together: each row's outputs
    are those it gets alone; a row then leaves (select) and a new one joins (concat), mid-decode."""
    mixer = _mixer(name)
    prompts = [torch.randn(1, n, D, dtype=F64) for n in (7, 3, 5)]
    follow = torch.randn(3, 6, D, dtype=F64)
    newcomer, new_follow = torch.randn(1, 4, D, dtype=F64), torch.randn(1, 3, D, dtype=F64)
    with torch.no_grad():
        alone = [mixer(p, return_state=True)[1] for p in prompts]
        joined = type(alone[0]).concat(alone)
        assert joined.batch_size == 3
        y, joined = _steps(mixer, follow[:, :3], joined)
        for row, state in enumerate(alone):
            y_alone, alone[row] = _steps(mixer, follow[row : row + 1, :3], state)
            assert_close(y[row : row + 1], y_alone, msg=f"row {row}")
        # Row 1 leaves, a new row joins, and the batch goes on.
        _, new_state = mixer(newcomer, return_state=True)
        joined = type(joined).concat([joined.select([0, 2]), new_state])
        rest = torch.cat([follow[[0, 2], 3:], new_follow])
        y, _ = _steps(mixer, rest, joined)
        for row, state in enumerate([alone[0], alone[2], new_state]):
            y_alone, _ = _steps(mixer, rest[row : row + 1], state)
            assert_close(y[row : row + 1], y_alone, msg=f"row {row} after the change")


@pytest.mark.parametrize("name", MIXERS)
def test_joined_rows_prefill_in_parallel_as_each_alone(name):
    """A parallel pass (chunked prefill) after a joined state: each row continues from its own position."""
    mixer = _mixer(name)
    prompts = [torch.randn(1, n, D, dtype=F64) for n in (2, 6)]
    more = torch.randn(2, 5, D, dtype=F64)
    with torch.no_grad():
        alone = [mixer(p, return_state=True)[1] for p in prompts]
        y, state = mixer(more, type(alone[0]).concat(alone), return_state=True)
        for row, s in enumerate(alone):
            y_alone, s_alone = mixer(more[row : row + 1], s, return_state=True)
            assert_close(y[row : row + 1], y_alone, msg=f"row {row}")
            after = torch.randn(1, D, dtype=F64)
            y_next = mixer.step(torch.cat([after, after]), state)[0][row : row + 1]
            assert_close(y_next, mixer.step(after, s_alone)[0], msg=f"row {row}, next step")


@pytest.mark.parametrize("name", MIXERS)
def test_select_and_concat_round_trips(name):
    mixer = _mixer(name)
    x = torch.randn(3, 5, D, dtype=F64)
    with torch.no_grad():
        _, state = mixer(x, return_state=True)
    cls = type(state)
    _assert_same_state(cls.concat([state.select([0]), state.select(torch.tensor([1, 2]))]), state)
    _assert_same_state(state.select([2, 0, 1]).select([1, 2, 0]), state)
    repeated = state.select([1, 1])
    assert repeated.batch_size == 2
    _assert_same_state(repeated.select([0]), state.select([1]))
    with torch.no_grad():  # and the rows still step like the originals
        step_in = torch.randn(3, D, dtype=F64)
        y, _ = mixer.step(step_in, state)
        y_perm, _ = mixer.step(step_in[[2, 0, 1]], state.select([2, 0, 1]))
    assert_close(y_perm, y[[2, 0, 1]])


@pytest.mark.parametrize("name", MIXERS)
def test_to_tensors_round_trip(name):
    mixer = _mixer(name)
    x, x_t = torch.randn(2, 6, D, dtype=F64), torch.randn(2, D, dtype=F64)
    with torch.no_grad():
        _, state = mixer(x, return_state=True)
        tensors = state.to_tensors()
        assert all(not t.is_complex() for t in tensors.values()), "named tensors are real"
        saved = {k: v.clone() for k, v in tensors.items()}
        rebuilt = state_type(type(state).__name__).from_tensors(tensors)
        _assert_same_state(rebuilt, state)
        y, _ = mixer.step(x_t, rebuilt)
        assert_close(y, mixer.step(x_t, state)[0], strict=True)
    for k in saved:  # stepping a rebuilt state never writes into the tensors it was built from
        assert torch.equal(tensors[k], saved[k]), k


@pytest.mark.parametrize("name", MIXERS)
def test_to_keeps_ssm_states_in_their_compute_precision(name):
    mixer = _mixer(name).float()
    with torch.no_grad():
        _, state = mixer(torch.randn(2, 4, D), return_state=True)
    half = state.to(dtype=torch.bfloat16)
    for t in half.to_tensors().values():
        if t.is_floating_point():
            expected = torch.bfloat16 if isinstance(state, AttentionState) else torch.float32
            assert t.dtype == expected
    wide = state.to(dtype=F64)
    assert {t.dtype for t in wide.to_tensors().values() if t.is_floating_point()} == {F64}
    assert state.to() is not None and state.to("cpu").batch_size == 2


def test_state_types_are_registered_and_concat_refuses_mixed_types():
    assert {"H3State", "S4DState", "AttentionState"} <= set(STATE_TYPES)
    assert state_type("H3State") is H3State
    with pytest.raises(ValueError, match="unknown mixer state type 'Mamba'"):
        state_type("Mamba")
    h3, s4d = _mixer("h3").init_state(1), _mixer("s4d").init_state(1)
    assert isinstance(s4d, S4DState)
    with pytest.raises(TypeError, match="states of different layers"):
        H3State.concat([h3, s4d])
    with pytest.raises(ValueError, match="at least one state"):
        AttentionState.concat([])
    with pytest.raises(ValueError, match="1-D"):
        h3.select([[0]])


def test_attention_rows_know_their_lengths_and_concat_trims_unused_slots():
    mixer = _mixer("rotary-attention")
    with torch.no_grad():
        _, long = mixer(torch.randn(1, 9, D, dtype=F64), return_state=True)
        _, short = mixer(torch.randn(2, 3, D, dtype=F64), return_state=True)
        joined = AttentionState.concat([long, short])
        assert joined.lengths().tolist() == [9, 3, 3] and joined.end == 9
        _, joined = mixer.step(torch.randn(3, D, dtype=F64), joined)
        assert joined.lengths().tolist() == [10, 4, 4]
        # The long row leaves: the slots only it used are dropped when the rows are next joined.
        compact = AttentionState.concat([joined.select([1, 2])])
    assert compact.end == 4 and compact.lengths().tolist() == [4, 4]


def test_attention_state_is_a_value_under_branching():
    """Extending one state twice (two branches) leaves each branch what it was; in-place writes only at the end."""
    mixer = _mixer("rotary-attention")
    x = torch.randn(2, 5, D, dtype=F64)
    a_in, b_in, c_in = (torch.randn(2, D, dtype=F64) for _ in range(3))
    with torch.no_grad():
        _, saved = mixer(x, return_state=True)
        _, branch_a = mixer.step(a_in, saved)
        _, branch_b = mixer.step(b_in, saved)  # the slot after `saved` is taken: this copies
        assert branch_b.buffers is not branch_a.buffers
        _, a_next = mixer.step(c_in, branch_a)  # branch_a ends where its buffers end: in place
        assert a_next.buffers is branch_a.buffers
        y_a = mixer.step(c_in, branch_a)[0]  # branch_a again: must still see a_in, not b_in
        y_ref = mixer(torch.cat([x, a_in[:, None], c_in[:, None]], 1))[0][:, -1]
    assert_close(y_a, y_ref)
    assert_close(branch_a.keys()[:, :, :5], saved.keys(), strict=True)
