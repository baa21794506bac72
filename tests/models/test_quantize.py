"""hippos.quantize: which modules turn int8, the original left alone, logits and generation close to fp32, the
state contract within the quantization error, save/load without pickle, and clear refusals."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

import hippos
import hippos.layers.int8_linear as int8
from hippos import H3LM, H3Config
from hippos.layers import Int8Linear
from hippos.models.quantize import quantization_of

MODELS = {  # the mixes of mixers a model can have
    "h3": {"attn_layer_idx": ()},
    "hybrid": {"attn_layer_idx": (1,)},
    "transformer": {"attn_layer_idx": (0, 1)},
    "s4d": {"attn_layer_idx": (), "ssm_mixer": "s4d"},
}
# Relative logit error of int8 against fp32 (norm of the difference over the norm of the centred logits). Measured
# 0.022-0.034 on these tiny random models: weights rounded to 1/254 of each row's range, activations to 7 bits.
# A wrong scale or a transposed weight gives errors of order 1.
REL_ERROR = 0.08


def _model(kind: str, seed: int = 0) -> H3LM:
    torch.manual_seed(seed)
    return H3LM(H3Config.preset("tiny", **MODELS[kind])).eval()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm of the difference over the norm of expected's logits centred per position."""
    return float((actual - expected).norm() / (expected - expected.mean(-1, keepdim=True)).norm())


def test_every_linear_layer_and_the_head_turn_int8_and_the_rest_stays_float():
    model = _model("hybrid")
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    q = hippos.quantize(model)
    assert {name for name, m in q.named_modules() if isinstance(m, Int8Linear)} == linears
    assert "lm_head" in linears and not any(isinstance(m, nn.Linear) for m in q.modules())
    assert {"backbone.layers.0.mixer.q_proj", "backbone.layers.1.mixer.Wqkv", "backbone.layers.0.mlp.fc1"} <= linears
    embedding = q.backbone.embeddings.word_embeddings.weight
    assert embedding.dtype == torch.float32 and torch.equal(embedding, model.lm_head.weight)  # the lookup: fp32
    assert q.lm_head.qweight.dtype == torch.int8 and q.lm_head.qweight.shape == embedding.shape  # its own copy
    # SSM parameters and norms: float, the values they had.
    floats = {k: v for k, v in q.state_dict().items() if v.dtype != torch.int8}
    for key in ("backbone.layers.0.mixer.diag.log_dt", "backbone.layers.0.mixer.ssm_k_D", "backbone.ln_f.weight"):
        assert floats[key].dtype == torch.float32 and torch.equal(floats[key], model.state_dict()[key])
    assert quantization_of(q) == "int8" and quantization_of(model) == "none"
    assert not q.training and not any(p.requires_grad for p in q.parameters())


def test_the_original_model_is_left_untouched():
    model = _model("hybrid").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = hippos.quantize(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.backbone.embeddings.word_embeddings.weight  # still tied
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and set(before) == set(
        model.state_dict()
    )
    shared = {p.data_ptr() for p in model.parameters()} & {t.data_ptr() for t in (*q.parameters(), *q.buffers())}
    assert not shared  # nothing of the copy aliases the original


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_are_close_to_fp32_and_greedy_generation_runs(kind):
    model = _model(kind)
    q = hippos.quantize(model)
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(q(ids).logits, model(ids).logits) < REL_ERROR
    out = hippos.generate(q, ids[:, :6], 10, temperature=0)
    assert out.shape == (2, 16) and torch.equal(out[:, :6], ids[:, :6])
    assert int(out.max()) < model.config.vocab_size


@pytest.mark.parametrize("kind", ["h3", "hybrid", "transformer"])
def test_prompt_then_steps_agree_with_one_parallel_pass_within_the_quantization_error(kind):
    """The parallel pass rounds all positions' activations together, a step one token's: not bit-equal."""
    q = hippos.quantize(_model(kind))
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = q(ids).logits[:, 11:19]
        out = q(ids[:, :12], return_state=True)
        logits, state, stepped = out.logits[:, -1], out.state, []
        for t in range(12, 20):
            stepped.append(logits)
            logits, state = q.step(ids[:, t], state)
    assert _rel(torch.stack(stepped, 1), whole) < REL_ERROR


def test_the_fallback_path_gives_the_same_model_up_to_activation_rounding(monkeypatch):
    model = _model("hybrid")
    q = hippos.quantize(model)
    ids = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = q(ids).logits
        monkeypatch.setattr(int8, "fast_path_available", lambda: False)
        slow_q = hippos.quantize(model)
        slow = slow_q(ids).logits
    assert all(m.packed() is None for m in slow_q.modules() if isinstance(m, Int8Linear))
    assert _rel(slow, model(ids).logits.detach()) < REL_ERROR and _rel(fast, slow) < REL_ERROR
    assert hippos.generate(slow_q, ids[:, :4], 5, temperature=0).shape == (1, 9)


def test_save_and_load_give_identical_logits_without_pickle(tmp_path, monkeypatch):
    q = hippos.quantize(_model("hybrid"))
    q.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["quantization"] == "int8"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.qweight").dtype == torch.int8 and "lm_head.weight" not in keys
        assert f.get_tensor("backbone.layers.0.mlp.fc1.scale").dtype == torch.float32

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized model must load without pickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded = H3LM.from_pretrained(tmp_path)
    assert quantization_of(loaded) == "int8" and not loaded.training
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    assert torch.equal(hippos.generate(loaded, ids, 6, temperature=0), hippos.generate(q, ids, 6, temperature=0))


def test_float_directories_keep_their_config_and_load_as_before(tmp_path):
    model = _model("h3")
    model.save_pretrained(tmp_path)
    assert "quantization" not in json.loads((tmp_path / "config.json").read_text())
    assert quantization_of(H3LM.from_pretrained(tmp_path)) == "none"


def test_a_damaged_quantized_directory_lists_its_missing_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    hippos.quantize(_model("h3")).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.scale"], tensors["backbone.layers.1.mlp.fc2.qweight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(2\): backbone.layers.1.mlp.fc2.qweight, lm_head.scale"):
        H3LM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": "int3"}))
    with pytest.raises(ValueError, match="unknown quantization 'int3' in the saved config"):
        H3LM.from_pretrained(tmp_path)


def test_refusals_name_the_problem():
    model = _model("h3")
    with pytest.raises(ValueError, match="unknown quantization method 'int4'; choose one of: int8"):
        hippos.quantize(model, "int4")
    with pytest.raises(ValueError, match="already quantized \\(int8\\); quantize its float model"):
        hippos.quantize(hippos.quantize(model))
    with pytest.raises(TypeError, match="quantize takes an H3LM"):
        hippos.quantize(nn.Linear(3, 3))
    q = hippos.quantize(model).requires_grad_(True)  # asking the quantized copy for gradients anyway
    with pytest.raises(RuntimeError, match="train the float model, then quantize it"):
        q(torch.tensor([[1, 2, 3]])).logits.sum().backward()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_no_int8_layer_is_dequantized_to_run_the_model(kind, monkeypatch):
    """Prefill, steps, a fresh state and generate() run the int8 products: reading `.weight` (the dequantized
    copy, kept for code that needs a float matrix) would quietly make the model weight-only and slow."""
    q = hippos.quantize(_model(kind))

    def refuse(self):
        raise AssertionError(f"{type(self).__name__}.weight read while running the model")

    monkeypatch.setattr(Int8Linear, "weight", property(refuse))
    ids = torch.randint(0, q.config.vocab_size, (2, 9))
    out = q(ids, return_state=True)
    q.step(ids[:, 0], out.state)
    q.init_state(2)
    hippos.generate(q, ids, 3, temperature=0)
