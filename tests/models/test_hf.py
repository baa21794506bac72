"""The Hugging Face interface: H3ForCausalLM vs the native H3LM, generate(), save/load, Auto registration."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from hippos import H3LM, H3Config  # noqa: E402
from hippos.models.hf import _CACHE_FIELD, H3Cache, H3ForCausalLM, H3HFConfig  # noqa: E402
from tolerances import assert_close  # noqa: E402

# generate()'s name for the cache: `cache` from transformers 5.24, `past_key_values` before (both are tested:
# `make test` runs the locked, newest release; `make test-lowest` the oldest pyproject allows).
CACHE = _CACHE_FIELD

VARIANTS = {
    "h3": {"attn_layer_idx": ()},
    "hybrid": {"attn_layer_idx": (1,)},
    "rotary": {"attn_layer_idx": (1,), "rotary_dim": 8},
    "transformer": {"attn_layer_idx": (0, 1)},
}


def make(variant: str, dtype=torch.float32) -> tuple[H3LM, H3ForCausalLM]:
    """A tiny native model and its HF wrapper (sharing weights). The vocabulary (257) is padded to 264, and a
    large init spread makes greedy continuations vary instead of repeating one token."""
    torch.manual_seed(0)
    config = H3Config.preset("tiny", initializer_range=0.3, **VARIANTS[variant])
    assert config.padded_vocab_size > config.vocab_size
    lm = H3LM(config).to(dtype).eval()
    return lm, H3ForCausalLM.from_hippos(lm).eval()


def hippos_greedy(lm: H3LM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: prompt in parallel, then H3LM.step; argmax over the real vocabulary."""
    V = lm.config.vocab_size
    with torch.no_grad():
        out = lm(prompt, return_state=True)
        token, state = out.logits[:, -1, :V].argmax(-1), out.state
        tokens = [token]
        for _ in range(n - 1):
            logits, state = lm.step(token, state)
            token = logits[:, :V].argmax(-1)
            tokens.append(token)
    return torch.cat([prompt, torch.stack(tokens, 1)], 1)


def generate(model: H3ForCausalLM, ids: torch.Tensor, n: int, **options) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, do_sample=False, **options)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Bit-identical tensors (token ids, or the same computation twice)."""
    assert actual.shape == expected.shape and torch.equal(actual, expected), f"{msg}\n{actual}\n!=\n{expected}"


# ---- config ------------------------------------------------------------------------------------------------
def test_config_mirrors_h3config():
    hf_fields = {f.name: f.default for f in dataclasses.fields(H3HFConfig)}
    for f in dataclasses.fields(H3Config):
        assert f.name in hf_fields, f"H3HFConfig lacks H3Config.{f.name}"
        assert hf_fields[f.name] == f.default, f"default of {f.name} differs"
    config = H3Config.preset("tiny", rotary_dim=8)
    assert H3HFConfig.from_h3_config(config).to_h3_config() == config
    assert H3HFConfig.from_h3_config(config).hidden_size == config.d_model  # transformers' generic names
    with pytest.raises(ValueError, match="attn_layer_idx"):
        H3HFConfig(n_layer=2, attn_layer_idx=(5,))
    with pytest.raises(ValueError, match="tie"):
        H3HFConfig(tie_word_embeddings=False)


def test_importing_the_module_registers_it_with_the_auto_classes():
    assert type(AutoConfig.for_model("h3", n_layer=2)) is H3HFConfig
    assert AutoModelForCausalLM._model_mapping[H3HFConfig] is H3ForCausalLM


# ---- forward -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_native(variant):
    lm, hf = make(variant, torch.float64)
    V = lm.config.vocab_size
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        native = lm(ids).logits
        out = hf(ids)
        (as_tuple,) = hf(ids, return_dict=False)
    assert out.logits.shape == (2, 11, V), "logits over the real vocabulary: padding ids are no tokens"
    assert_close(out.logits, native[..., :V], strict=True)
    assert getattr(out, CACHE) is None and out.loss is None
    assert_equal(as_tuple, out.logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_is_native_loss_with_shifted_labels(variant):
    lm, hf = make(variant)
    V = lm.config.vocab_size
    ids = torch.randint(0, V, (2, 9))
    labels = ids.clone()
    labels[0, 3] = labels[1, 7] = -100
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    hf_loss = hf(ids, labels=labels).loss
    native_loss = lm(ids, labels=shifted).loss
    assert_close(hf_loss, native_loss, strict=True)
    hf_loss.backward()
    assert lm.backbone.embeddings.word_embeddings.weight.grad is not None
    # Trainer's gradient accumulation: sum over the batch's tokens / the count it passes
    count = int((shifted != -100).sum())
    total = hf(ids, labels=labels, num_items_in_batch=3 * count).loss
    assert_close(total, native_loss / 3, strict=True)


def test_attention_mask_rules():
    lm, hf = make("rotary", torch.float64)
    ids = torch.randint(0, lm.config.vocab_size, (2, 8))
    # Right padding without a cache changes nothing at the real positions (the model is causal).
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        assert_equal(hf(ids, attention_mask=mask).logits, hf(ids).logits)
        holes = torch.ones_like(ids)
        holes[0, 3] = 0
        with pytest.raises(ValueError, match="left padding"):
            hf(ids, attention_mask=holes)
        cache = hf(ids, use_cache=True)[CACHE]
        assert isinstance(cache, H3Cache) and cache.get_seq_length() == 8 and len(cache) == 2
        with pytest.raises(ValueError, match="start of a sequence"):
            hf(ids[:, :1], attention_mask=torch.tensor([[1] * 8 + [1], [1] * 8 + [0]]), cache=cache)


def test_the_cache_is_taken_under_either_name_and_nothing_is_ignored():
    """transformers 5.24 renamed past_key_values to cache and stopped passing the old name: a wrapper that missed
    the new name dropped the state from the second token on, silently. Every keyword is now read or refused."""
    lm, hf = make("hybrid", torch.float64)
    ids = torch.randint(0, lm.config.vocab_size, (2, 6))
    with torch.no_grad():
        whole = hf(ids).logits
        cache = hf(ids[:, :4], use_cache=True)[CACHE]
        for name in ("cache", "past_key_values"):
            rest = hf(ids[:, 4:], **{name: cache}).logits
            assert_close(rest, whole[:, 4:], strict=True, msg=name)
        with pytest.raises(TypeError, match="not both"):
            hf(ids[:, 4:], cache=cache, past_key_values=cache)
        with pytest.raises(TypeError, match="H3Cache"):
            hf(ids[:, 4:], cache=(torch.zeros(1),))
        with pytest.raises(TypeError, match="does not understand: cache_params"):
            hf(ids, cache_params=cache)
        with pytest.raises(NotImplementedError, match="position_ids"):
            hf(ids, position_ids=torch.arange(6).expand(2, 6))
        with pytest.raises(NotImplementedError, match="inputs_embeds"):
            hf(ids, inputs_embeds=torch.zeros(2, 6, lm.config.d_model))
        with pytest.raises(ValueError, match="cache_position"):
            hf(ids[:, 4:], cache=cache, cache_position=torch.tensor([0, 1]))
        # What transformers passes with empty values, and positions that agree with the cache, are fine.
        hf(ids[:, 4:], cache=cache, cache_position=torch.tensor([4, 5]), inputs_embeds=None, output_attentions=False)


# ---- generate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_equals_hippos_greedy_loop(variant):
    lm, hf = make(variant)
    prompt = torch.randint(0, lm.config.vocab_size, (2, 7))
    expected = hippos_greedy(lm, prompt, 10)
    assert expected[:, 7:].unique().numel() > 3, "degenerate continuation: the comparison would prove little"
    assert_equal(generate(hf, prompt, 10), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_each_prompt_alone(variant):
    lm, hf = make(variant, torch.float64)
    V, n = lm.config.vocab_size, 8
    prompts = [torch.randint(1, V, (length,)) for length in (6, 2, 4)]
    L = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), L, dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, L - len(p) :], mask[i, L - len(p) :] = p, 1
    together = generate(hf, batch, n, attention_mask=mask, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = generate(hf, p[None], n)
        assert_equal(together[i, L:], alone[0, len(p) :])


def test_cache_paths_agree():
    """No cache (whole sequence each step), beam search (reorder_cache), and continuing from a returned cache."""
    lm, hf = make("rotary", torch.float64)
    prompt = torch.randint(1, lm.config.vocab_size, (2, 5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    opts = {"attention_mask": mask, "pad_token_id": 0}
    cached = generate(hf, prompt, 6, **opts)
    assert_equal(generate(hf, prompt, 6, use_cache=False, **opts), cached)
    beams = generate(hf, prompt, 6, num_beams=3, **opts)
    assert_equal(generate(hf, prompt, 6, num_beams=3, use_cache=False, **opts), beams)

    first = hf.generate(prompt[:1], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = first[CACHE]
    assert isinstance(cache, H3Cache) and cache.get_seq_length() == 5 + 3 - 1
    for _ in range(2):  # a cache is a value: it can seed a continuation twice
        more = generate(hf, first.sequences, 3, **{CACHE: cache})
        assert_equal(more, generate(hf, prompt[:1], 6))


def test_generate_never_emits_padding_ids():
    lm, hf = make("hybrid")
    V = lm.config.vocab_size
    with torch.no_grad():  # the padding rows of the tied embedding made to dominate the logits
        lm.backbone.ln_f.bias[0] = 10.0
        lm.lm_head.weight[V:] = 0.0
        lm.lm_head.weight[V:, 0] = 10.0
        prompt = torch.randint(0, V, (4, 5))
        assert (lm(prompt).logits[:, -1].argmax(-1) >= V).all(), "the padding ids would win if they were offered"
    assert generate(hf, prompt, 5).max() < V
    torch.manual_seed(1)
    assert hf.generate(prompt, max_new_tokens=5, do_sample=True, top_k=0, temperature=3.0).max() < V


# ---- conversion, save and load -----------------------------------------------------------------------------
def test_from_hippos_shares_and_fresh_model_is_tied():
    lm, hf = make("hybrid")
    assert hf.to_hippos() is lm and hf.lm_head.weight is lm.backbone.embeddings.word_embeddings.weight
    assert set(hf.state_dict()) == set(lm.state_dict())
    fresh = H3ForCausalLM(H3HFConfig.from_h3_config(H3Config.preset("tiny", d_inner=1024)))
    assert fresh.lm_head.weight is fresh.backbone.embeddings.word_embeddings.weight
    fc1, fc2 = fresh.backbone.layers[0].mlp.fc1.weight, fresh.backbone.layers[0].mlp.fc2.weight
    assert 0.015 < fc1.std() < 0.025 and 0.0075 < fc2.std() < 0.0125  # H3LM's init: fc2 scaled by 1/sqrt(2 n_layer)


def assert_same_model(loaded: H3ForCausalLM, lm: H3LM) -> None:
    assert type(loaded) is H3ForCausalLM and not loaded.training
    assert loaded.lm_head.weight is loaded.backbone.embeddings.word_embeddings.weight, "the tie must survive"
    for name, tensor in lm.state_dict().items():
        assert_equal(loaded.state_dict()[name], tensor, name)
    # Optimiser groups are chosen from the module classes (ssm_parameter_names): the same modules under the same
    # names give the same groups.
    modules = {name: type(m) for name, m in lm.named_modules() if name}
    assert {name: type(m) for name, m in loaded.named_modules() if name} == modules, "SSM group"
    ids = torch.randint(0, lm.config.vocab_size, (2, 9))
    V = lm.config.vocab_size
    with torch.no_grad():  # not bit-equal: transformers keeps the weights in the memory-mapped file, whose
        # alignment sends the CPU's matrix products down other code paths (other rounding)
        assert_close(loaded(ids).logits[..., :V], lm(ids).logits[..., :V])


def test_hf_save_pretrained_round_trip(tmp_path):
    lm, hf = make("rotary")
    hf.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is H3HFConfig
    assert set(load_file(tmp_path / "model.safetensors")) == set(lm.state_dict()) - {"lm_head.weight"}
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path), lm)
    native = H3LM.from_pretrained(tmp_path)  # and hippos reads what transformers wrote
    assert native.config == lm.config
    ids = torch.randint(0, lm.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert_equal(native(ids).logits, lm(ids).logits)


@pytest.mark.parametrize("variant", ["h3", "rotary"])
def test_auto_model_loads_hippos_directory(tmp_path, variant):
    lm, _ = make(variant)
    lm.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_model(loaded, lm)
    assert loaded.to_hippos().config == lm.config


# ---- registration: by importing hippos.models.hf, nothing patched ----------------------------------------------
def run_python(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.slow  # fresh processes importing transformers
def test_registration_in_either_import_order(tmp_path):
    """`import hippos` never imports transformers nor touches the import machinery; `import hippos.models.hf`
    registers the models, whether transformers was imported before or not."""
    lm, _ = make("hybrid")
    lm.save_pretrained(tmp_path)
    load = f"""
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        assert type(model).__name__ == "H3ForCausalLM", type(model)
        print("ok")
    """
    hippos_first = """
        import sys
        finders = list(sys.meta_path)
        import hippos
        assert "transformers" not in sys.modules, "import hippos imported transformers"
        assert sys.meta_path == finders, "import hippos changed sys.meta_path"
        import hippos.models.hf
        from transformers import AutoModelForCausalLM
    """
    transformers_first = """
        import transformers
        import hippos.models.hf
        from transformers import AutoModelForCausalLM
    """
    runs = [run_python(head + load) for head in (hippos_first, transformers_first)]  # in parallel
    for name, proc in zip(("hippos first", "transformers first"), runs):
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 0 and output.strip().endswith("ok"), f"{name}:\n{output}"
