"""The H3 layer: against the math written out, parallel vs recurrent, state passing, modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hippos.layers.diagonal_ssm as diagonal_ssm_module
from hippos.layers import H3, H3State
from hippos.ops import causal_conv_ref, diag_kernel_ref, shift_kernel_ref
from tolerances import assert_close

F64 = torch.float64
D_MODEL, D_STATE = 16, 8
MODES = ["fft", "chunked", "auto"]


def _h3(head_dim=1, mode="auto", chunk=8, discretization="bilinear", seed=0):
    torch.manual_seed(seed)
    layer = H3(D_MODEL, D_STATE, head_dim, mode=mode, chunk=chunk, discretization=discretization, dt_max=0.5)
    with torch.no_grad():
        layer.shift.B.add_(0.3 * torch.randn_like(layer.shift.B))  # a trained shift B is not e_1
    return layer.double()


def h3_reference(m: H3, x: torch.Tensor) -> torch.Tensor:
    """The H3 layer of docs/math.md, written out with the module's parameters; x (B, L, D) float64."""
    Bsz, L, D = x.shape
    H, hd = m.n_heads, m.head_dim
    q, k, v = (F.linear(x, p.weight, p.bias).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    k = causal_conv_ref(k, shift_kernel_ref(m.shift.B, m.shift.C), m.ssm_k_D)  # k' = shift_ssm(k) + D_k k
    dt = m.diag.log_dt.exp()[:, None]
    A = torch.complex(-m.diag.inv_A_real.exp(), m.diag.A_imag)
    B_, C_ = (torch.complex(t[..., 0], t[..., 1]) for t in (m.diag.B, m.diag.C))
    if m.diag.discretization == "bilinear":
        dA, dB = (1 + dt * A / 2) / (1 - dt * A / 2), dt * B_ / (1 - dt * A / 2)
    else:
        dA = torch.exp(dt * A)
        dB = B_ * (dA - 1) / A
    K = diag_kernel_ref(dA, dB, C_, L)  # (H, L)
    q, k, v = (t.reshape(Bsz, H, hd, L) for t in (q, k, v))
    out = torch.zeros_like(q)
    for d1 in range(hd):
        for d2 in range(hd):  # out[h, d2] += q[h, d1] (diag_ssm(kv) + D kv), kv = k'[h, d1] v[h, d2]
            out[:, :, d2] += q[:, :, d1] * causal_conv_ref(k[:, :, d1] * v[:, :, d2], K, m.D)
    return F.linear(out.reshape(Bsz, D, L).transpose(1, 2), m.output_linear.weight, m.output_linear.bias)


@pytest.mark.parametrize(
    ("head_dim", "discretization"), [(1, "bilinear"), (1, "zoh"), (2, "bilinear"), (4, "bilinear")]
)
def test_matches_written_out_math(head_dim, discretization):
    layer = _h3(head_dim, discretization=discretization)
    x = torch.randn(2, 23, D_MODEL, dtype=F64)
    with torch.no_grad():
        assert_close(layer(x)[0], h3_reference(layer, x))


@pytest.mark.parametrize("head_dim", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_parallel_equals_steps(mode, head_dim, run_steps):
    layer = _h3(head_dim, mode)
    x = torch.randn(2, 37, D_MODEL, dtype=F64)
    with torch.no_grad():
        y, state = layer(x, return_state=True)
        y_steps, state_steps = run_steps(layer, x, layer.init_state(2))
    assert_close(y_steps, y)
    assert_close(state_steps.shift, state.shift)
    assert_close(state_steps.diag, state.diag)


@pytest.mark.parametrize("head_dim", [1, 2])
@pytest.mark.parametrize("mode", ["fft", "chunked"])
@pytest.mark.parametrize("sizes", [(8, 16, 13), (5, 11, 1, 20), (3, 34)])
def test_chunked_prefill(sizes, mode, head_dim):
    """Pieces whose sizes do and do not divide the chunk size (8), the state handed from one to the next."""
    layer = _h3(head_dim, mode)
    x = torch.randn(2, 37, D_MODEL, dtype=F64)
    with torch.no_grad():
        y_one, state_one = layer(x, return_state=True)
        ys, state = [], None
        for piece in torch.split(x, list(sizes), dim=1):
            y, state = layer(piece, state, return_state=True)
            ys.append(y)
    assert_close(torch.cat(ys, 1), y_one)
    assert_close(state.shift, state_one.shift)
    assert_close(state.diag, state_one.diag)


@pytest.mark.parametrize("head_dim", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_prompt_then_steps(mode, head_dim, run_steps):
    layer = _h3(head_dim, mode)
    x = torch.randn(3, 30, D_MODEL, dtype=F64)
    with torch.no_grad():
        y_full, _ = layer(x)
        y_prompt, state = layer(x[:, :19], return_state=True)
        y_rest, _ = run_steps(layer, x[:, 19:], state)
    assert_close(torch.cat([y_prompt, y_rest], 1), y_full)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_modes_agree_outputs_and_gradients(head_dim, grads_of, monkeypatch):
    monkeypatch.setattr(diagonal_ssm_module, "AUTO_CHUNKED_FROM", 32)  # so "auto" picks chunked at L = 40
    layers = {mode: _h3(head_dim, mode, chunk=6) for mode in MODES}
    for layer in layers.values():
        layer.load_state_dict(layers["fft"].state_dict())
    x = torch.randn(2, 40, D_MODEL, dtype=F64)
    assert layers["auto"].diag.resolve_mode(x.shape[1]) == "chunked"
    results = {}
    for mode, layer in layers.items():
        y, _ = layer(x)
        names, params = zip(*layer.named_parameters(), strict=True)
        results[mode] = (y, dict(zip(names, grads_of(y, params), strict=True)))
    y_ref, g_ref = results["fft"]
    for mode in ("chunked", "auto"):
        y, g = results[mode]
        assert_close(y, y_ref)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            assert_close(g[name], g_ref[name], msg=f"{mode} {name}")


def test_gradient_through_steps_equals_parallel(grads_of, run_steps):
    layer = _h3(head_dim=2)
    x = torch.randn(2, 12, D_MODEL, dtype=F64, requires_grad=True)
    inputs = [x, *layer.parameters()]
    g_par = grads_of(layer(x)[0], inputs)
    g_step = grads_of(run_steps(layer, x, layer.init_state(2))[0], inputs)
    for a, b in zip(g_step, g_par, strict=True):
        assert_close(a, b)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    L=st.integers(1, 70),
    chunk=st.integers(1, 40),
    head_dim=st.sampled_from([1, 2]),
    mode=st.sampled_from(["fft", "chunked"]),
    seed=st.integers(0, 2**16),
)
def test_property_parallel_equals_steps(batch, L, chunk, head_dim, mode, seed, run_steps):
    layer = _h3(head_dim, mode, chunk=chunk, seed=seed)
    x = torch.randn(batch, L, D_MODEL, dtype=F64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y, state = layer(x, return_state=True)
        y_steps, state_steps = run_steps(layer, x, layer.init_state(batch))
    assert y.shape == x.shape
    assert_close(y_steps, y)
    assert_close(state_steps.diag, state.diag)


def test_init_state_shapes():
    s1 = _h3(head_dim=1).init_state(3)
    s4 = _h3(head_dim=4).init_state(3)
    assert isinstance(s1, H3State)
    assert s1.shift.shape == (3, D_MODEL, D_STATE) and s1.shift.dtype == F64
    assert s1.diag.shape == (3, D_MODEL, D_STATE // 2) and s1.diag.dtype == torch.complex128
    assert s4.diag.shape == (3, 4, 4, D_MODEL // 4, D_STATE // 2)


# ---- half precision ---------------------------------------------------------------------------------------


def test_bfloat16_smoke():
    layer = H3(D_MODEL, D_STATE, dtype=torch.bfloat16)
    reference = H3(D_MODEL, D_STATE)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(2, 50, D_MODEL).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)[0]
        y32 = reference(x.float())[0]
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    rel = ((y.float() - y32).norm() / y32.norm()).item()
    assert rel < 5e-2, rel


def test_saved_state_can_be_reused(run_steps):
    """Continuing twice from the same state (two branches) must not change what the first branch sees."""
    layer = _h3(head_dim=2)
    x = torch.randn(1, 6, D_MODEL, dtype=F64)
    other = torch.randn(1, D_MODEL, dtype=F64)
    with torch.no_grad():
        y_full, _ = layer(x)
        _, saved = layer(x[:, :4], return_state=True)
        _, branch_a = layer.step(x[:, 4], saved)
        layer.step(other, saved)
        y_a, _ = layer.step(x[:, 5], branch_a)
    assert_close(y_a, y_full[:, 5])
