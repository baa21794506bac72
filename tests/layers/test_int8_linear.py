"""Int8Linear: the int8 scheme, the fast path against its reference and the float layer, the forced fallback."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hippos.layers.int8_linear as int8
from hippos.layers import Int8Linear
from hippos.layers.decode_linear import decode_linear
from hippos.layers.int8_linear import fast_path_available, int8_linear, int8_linear_ref, pack_int8, quantize_weight
from tolerances import assert_close

fast_only = pytest.mark.skipif(not fast_path_available(), reason="no x86/fbgemm quantized engine in this build")


def _linear(in_features=48, out_features=40, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _activation_step(x: torch.Tensor) -> float:
    """The fast path's quantization step of x: its range (0 included) over 127 levels (7 bits, reduce_range)."""
    return float(x.max().clamp(min=0) - x.min().clamp(max=0)) / (2 ** (8 - int8.REDUCE_RANGE) - 1)


def test_weights_are_symmetric_per_output_channel():
    w = torch.randn(6, 10)
    w[2] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    nonzero = [0, 1, 3, 4, 5]
    assert_close(scale[nonzero], w[nonzero].abs().amax(1) / 127, strict=True)
    assert torch.equal(q[2], torch.zeros(10, dtype=torch.int8)) and float(scale[2]) > 0
    # Rounding to the nearest level: every weight within half a step of its row's scale.
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="float \\(out, in\\) weight"):
        quantize_weight(torch.ones(4, dtype=torch.int64).reshape(2, 2))


def test_reference_is_the_definition_in_float64():
    q = torch.randint(-127, 128, (7, 5), dtype=torch.int8)
    scale, bias = torch.rand(7, dtype=torch.float64) + 0.1, torch.randn(7, dtype=torch.float64)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    expected = F.linear(x, q.double() * scale[:, None], bias)
    assert_close(int8_linear_ref(x, q, scale, bias), expected, strict=True)
    assert_close(int8_linear_ref(x, q, scale), expected - bias, strict=True)


@fast_only
@pytest.mark.parametrize("shape", [(1, 48), (16, 48), (2, 9, 48), (48,)])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_is_within_one_activation_step_of_the_reference(shape, bias):
    """The fast path also rounds x to 7-bit levels: each output may move by sum_i |W[o, i]| * step / 2."""
    linear = _linear(bias=bias)
    q, scale = quantize_weight(linear.weight)
    b = linear.bias.detach() if bias else None
    x = torch.randn(shape)
    got = int8_linear(x, q, scale, b, packed=pack_int8(q, scale, b))
    ref = int8_linear_ref(x, q, scale, b)
    bound = (q.abs().float() * scale[:, None]).sum(1) * _activation_step(x) / 2
    assert got.shape == ref.shape == (*shape[:-1], 40) and got.dtype == torch.float32
    assert ((got - ref).abs() <= bound * 1.01 + 1e-6).all()
    assert not torch.equal(got, ref)  # the fast path did run (it rounds x; the reference does not)


def test_layer_is_within_the_quantization_error_of_the_float_layer():
    """|int8 - float| <= (weight rounding: sum_i |x_i| scale_o / 2) + (activation rounding, fast path only)."""
    linear = _linear()
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(5, 48)
    with torch.no_grad():
        err = (layer(x) - linear(x)).abs()
    weight_part = x.abs().sum(1, keepdim=True) * layer.scale / 2
    act_part = layer.weight.abs().sum(1) * _activation_step(x) / 2 if layer.packed() is not None else 0
    assert (err <= (weight_part + act_part) * 1.01 + 1e-6).all()
    assert float(err.max()) > 0  # it is quantized: not the float layer itself


def test_forced_fallback_runs_the_reference_exactly(monkeypatch):
    monkeypatch.setattr(int8, "fast_path_available", lambda: False)
    layer = Int8Linear.from_linear(_linear())
    x = torch.randn(3, 48)
    with torch.no_grad():
        got = layer(x)
    assert layer.packed() is None
    assert torch.equal(got, int8_linear_ref(x, layer.qweight, layer.scale, layer.bias))
    assert torch.equal(decode_linear(layer, x), got)


def test_other_dtypes_run_the_reference():
    layer = Int8Linear.from_linear(_linear()).double()
    x = torch.randn(3, 48, dtype=torch.float64)
    assert layer.scale.dtype == layer.bias.dtype == torch.float64 and layer.qweight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(layer(x), int8_linear_ref(x, layer.qweight, layer.scale, layer.bias))


@fast_only
def test_decode_linear_runs_the_layers_own_forward():
    layer = Int8Linear.from_linear(_linear(out_features=64))  # 64 rows: decode_linear would block a float layer
    x = torch.randn(1, 48)
    with torch.no_grad():
        assert torch.equal(decode_linear(layer, x), layer(x))
        # The layer's shortcut for (rows, in) inputs is int8_linear's fast path, for every input shape.
        for shape in ((1, 48), (5, 48), (2, 3, 48), (48,)):
            x = torch.randn(shape)
            expected = int8_linear(x, layer.qweight, layer.scale, layer.bias, packed=layer.packed())
            assert torch.equal(layer(x), expected) and layer.packed() is not None


@fast_only
def test_packed_weight_follows_loads_and_moves():
    layer = Int8Linear.from_linear(_linear(seed=0))
    other = Int8Linear.from_linear(_linear(seed=1))
    x = torch.randn(2, 48)
    with torch.no_grad():
        before = layer(x)
        first = layer.packed()
        assert layer.packed() is first  # made once, then kept
        layer.load_state_dict(other.state_dict())  # copied into the same buffers: the old pack is stale
        assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), before)
        layer.to("cpu")
        assert not layer._pack_made and torch.equal(layer(x), other(x))
        twin = copy.deepcopy(layer)
        assert not twin._pack_made and torch.equal(twin(x), other(x))
        twin.qweight, twin.scale = layer.qweight.neg(), layer.scale.clone()  # new buffers: packed again
        assert_close(twin(x), -layer(x) + 2 * layer.bias, scale=10)  # up to the rounding of x, as before


def test_no_gradients_and_clear_input_errors():
    layer = Int8Linear.from_linear(_linear())
    assert list(layer.parameters()) == [] and {n for n, _ in layer.named_buffers()} == {"qweight", "scale", "bias"}
    with pytest.raises(RuntimeError, match="inference and has no gradients"):
        layer(torch.randn(2, 48, requires_grad=True))
    with pytest.raises(ValueError, match=r"float \(\.\.\., 48\) inputs"):
        layer(torch.randn(2, 47))
    with pytest.raises(ValueError, match=r"float \(\.\.\., 48\) inputs"):
        layer(torch.ones(2, 48, dtype=torch.long))
    with torch.no_grad():
        assert layer(torch.randn(0, 48)).shape == (0, 40)


def test_state_dict_holds_int8_weights_and_float_scales():
    layer = Int8Linear.from_linear(_linear(bias=False))
    state = layer.state_dict()
    assert set(state) == {"qweight", "scale"} and state["qweight"].dtype == torch.int8
    fresh = Int8Linear(48, 40, bias=False)
    fresh.load_state_dict(state)
    x = torch.randn(2, 48)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    assert_close(fresh.weight, layer.qweight.float() * layer.scale[:, None], strict=True)
