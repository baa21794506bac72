"""H3LM: teacher-forced decoding equals the parallel pass, save/load, initialisation, bad input."""

import math

import pytest
import torch

from hippos import H3LM, H3Config, LMState
from hippos.layers.state import SSMState
from hippos.models.config import PRESETS
from tolerances import assert_close

VARIANTS = {
    "h3": {"attn_layer_idx": ()},
    "hybrid": {"attn_layer_idx": (1,)},
    "rotary-hybrid": {"attn_layer_idx": (1,), "rotary_dim": 8},
    "transformer": {"attn_layer_idx": (0, 1)},
    "s4d": {"attn_layer_idx": (), "ssm_mixer": "s4d"},
    "multihead-h3": {"attn_layer_idx": (1,), "head_dim": 4},
}


def tiny(variant="hybrid", **kw):
    torch.manual_seed(0)
    return H3LM(H3Config.preset("tiny", **VARIANTS[variant], **kw)).eval()


def teacher_forced(model, ids, state):
    logits = []
    for t in range(ids.shape[1]):
        out, state = model.step(ids[:, t], state)
        logits.append(out)
    return torch.stack(logits, 1), state


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_teacher_forced_decoding_equals_parallel(variant, dtype):
    model = tiny(variant).to(dtype)
    ids = torch.randint(0, 257, (2, 29))
    with torch.no_grad():
        parallel = model(ids).logits
        stepped, _ = teacher_forced(model, ids, model.init_state(2, dtype=dtype))
    assert_close(stepped, parallel)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_then_continue_equals_whole(variant):
    model = tiny(variant).double()
    ids = torch.randint(0, 257, (2, 30))
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :13], return_state=True)
        second = model(ids[:, 13:21], state=first.state, return_state=True)
        rest, _ = teacher_forced(model, ids[:, 21:], second.state)
    assert_close(torch.cat([first.logits, second.logits, rest], 1), whole)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_does_not_leak(variant):
    model = tiny(variant).double()
    ids = torch.randint(0, 257, (1, 11))
    padded = torch.cat([torch.full((1, 5), 7), ids], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 11)], 1).long()
    with torch.no_grad():
        alone = model(ids, return_state=True)
        batched = model(padded, attention_mask=mask, return_state=True)
        next_alone, _ = model.step(torch.tensor([3]), alone.state)
        next_batched, _ = model.step(torch.tensor([3]), batched.state)
    assert_close(batched.logits[:, 5:], alone.logits)
    assert_close(next_batched, next_alone)


def greedy_steps(model, logits, state, n):
    """n greedy tokens from the last logits (B, V) and state; returns (tokens (B, n), logits (B, n, V))."""
    tokens, all_logits = [], []
    for _ in range(n):
        token = logits[:, : model.config.vocab_size].argmax(-1)
        logits, state = model.step(token, state)
        tokens.append(token)
        all_logits.append(logits)
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_of_different_lengths_joined_decode_as_each_alone(variant):
    """Prompts run one by one, their states joined into one batch (LMState.concat), decoded together: each row
    gets the tokens and logits it gets alone, as a continuous-batching server needs."""
    model = tiny(variant).double()
    prompts = [torch.randint(0, 257, (1, n)) for n in (11, 4, 7)]
    with torch.no_grad():
        outs = [model(p, return_state=True) for p in prompts]
        joined = LMState.concat([o.state for o in outs])
        assert joined.batch_size == 3 and len(joined) == model.config.n_layer
        last = torch.cat([o.logits[:, -1] for o in outs])
        tokens, logits = greedy_steps(model, last, joined, 8)
        for row, out in enumerate(outs):
            tokens_alone, logits_alone = greedy_steps(model, out.logits[:, -1], out.state, 8)
            assert torch.equal(tokens[row : row + 1], tokens_alone), f"row {row}"
            assert_close(logits[row : row + 1], logits_alone, msg=f"row {row}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_step_extend_and_select_equal_the_value_operations(variant):
    """step(in_place=True), extend_ and select_ give exactly what step, concat and select give, changing only the
    LMState they are given; the in-place step writes every SSM state into its own tensors (no new ones)."""
    model = tiny(variant).double()
    with torch.no_grad():
        a = model(torch.randint(0, 257, (2, 9)), return_state=True).state
        b = model(torch.randint(0, 257, (1, 4)), return_state=True).state
        token = torch.tensor([5, 6, 7])
        expected, expected_state = model.step(token, LMState.concat([a, b]))
        owned = LMState(list(a.layers))
        owned.extend_(b)
        assert [s.batch_size for s in a.layers] == [2] * len(a)  # a itself untouched
        storage = _ssm_storage(owned)
        logits, returned = model.step(token, owned, in_place=True)
        assert returned is owned and torch.equal(logits, expected)
        assert _ssm_storage(owned) == storage
        owned.select_([2, 0])
        kept = expected_state.select([2, 0]).to_tensors()
    assert owned.batch_size == 2 and owned.to_tensors().keys() == kept.keys()
    assert all(torch.equal(t, kept[name]) for name, t in owned.to_tensors().items())
    with pytest.raises(ValueError, match="same model"):
        owned.extend_(LMState(owned.layers[:1]))


def _ssm_storage(state: LMState) -> list[int]:
    """Where each SSM layer's state tensors live (attention states manage their own buffers)."""
    return [t.data_ptr() for s in state if isinstance(s, SSMState) for t in s.to_tensors().values()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_state_protocol_round_trips(variant):
    model = tiny(variant).double()
    ids = torch.randint(0, 257, (3, 6))
    with torch.no_grad():
        state = model(ids, return_state=True).state
        tensors = state.to_tensors()
        assert all(key.split(".", 1)[0].isdigit() for key in tensors)
        rebuilt = LMState.from_tensors(tensors, state.type_names())
        swapped = LMState.concat([state.select([2]), state.select([0, 1])]).select([1, 2, 0])
        token = torch.tensor([5, 6, 7])
        expected, _ = model.step(token, state)
        for other in (rebuilt, swapped, state.to(dtype=torch.float64)):
            assert_close(model.step(token, other)[0], expected, strict=True)
    assert state.batch_size == 3 and state.select([0, 0]).batch_size == 2
    with pytest.raises(ValueError, match="names no layer"):
        LMState.from_tensors({"9.shift": torch.zeros(1)}, state.type_names())


def test_loss_is_cross_entropy_ignoring_minus_100():
    model = tiny()
    ids = torch.randint(0, 257, (2, 9))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert_close(out.loss, expected, strict=True)


@pytest.mark.parametrize("variant", ["h3", "transformer"])
def test_head_at_labelled_positions_only_gives_the_same_logits_loss_and_gradients(variant):
    model = tiny(variant).double().train()
    ids = torch.randint(0, 257, (3, 11))
    labels = torch.full_like(ids, -100)
    labels[:, [4, 7, 10]] = ids[:, [5, 8, 0]]  # a few graded positions, as in the recall tasks
    full = model(ids, labels=labels)
    sparse = model.loss(ids, labels)
    assert_close(sparse, full.loss, strict=True)
    assert_close(model.logits_at(ids, labels != -100), full.logits[labels != -100])
    grads = torch.autograd.grad(full.loss, model.parameters())
    sparse_grads = torch.autograd.grad(sparse, model.parameters())
    for a, b in zip(grads, sparse_grads):
        assert_close(a, b)
    with pytest.raises(ValueError, match="positions must be a bool tensor"):
        model.logits_at(ids, labels)
    with pytest.raises(ValueError, match="labels"):
        model.loss(ids, labels[:, :5])


def test_125m_parameter_count_matches_the_published_model():
    with torch.device("meta"):
        model = H3LM(H3Config.preset("H3-125M"))
    assert model.num_parameters() == 126_387_456
    assert model.config.padded_vocab_size == 50264


def test_head_is_tied_and_initialisation_follows_reference():
    torch.manual_seed(0)
    config = H3Config(d_model=128, n_layer=4, n_head=4, vocab_size=1000, attn_layer_idx=(1,))
    model = H3LM(config)
    assert model.lm_head.weight is model.backbone.embeddings.word_embeddings.weight
    blocks = model.backbone.layers
    small = 0.02 / math.sqrt(2 * config.n_layer)
    assert blocks[0].mlp.fc2.weight.std().item() == pytest.approx(small, rel=0.1)
    assert blocks[1].mixer.out_proj.weight.std().item() == pytest.approx(small, rel=0.1)
    assert blocks[0].mixer.output_linear.weight.std().item() == pytest.approx(0.02, rel=0.1)  # not rescaled
    assert blocks[0].mixer.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(blocks[0].mlp.fc1.bias == 0)
    # SSM parameters keep their own initialisation (S4D-Lin A).
    assert torch.allclose(blocks[0].mixer.diag.A_imag[0, :3], torch.tensor([0.0, math.pi, 2 * math.pi]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip(variant, tmp_path):
    model = tiny(variant)
    model.save_pretrained(tmp_path)
    loaded = H3LM.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == model.config
    ids = torch.randint(0, 257, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.word_embeddings.weight


def test_truncated_weights_are_refused_and_the_config_is_checked(tmp_path):
    tiny().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="damaged or truncated"):
        H3LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"d_model": 64, "n_layers": 2}')
    with pytest.raises(ValueError, match="unknown H3Config keys.*n_layers"):
        H3LM.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_all_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["backbone.ln_f.weight"], tensors["backbone.layers.0.mlp.fc1.bias"]
    tensors["backbone.extra"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        H3LM.from_pretrained(tmp_path)
    message = str(err.value)
    assert "backbone.ln_f.weight" in message and "backbone.layers.0.mlp.fc1.bias" in message
    assert "unexpected keys (1): backbone.extra" in message


def test_saving_is_atomic_the_old_file_survives_a_failed_write(tmp_path, monkeypatch):
    model = tiny()
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        (torch.tensor([[1, 2, 300]]), ValueError, "token ids must be in 0 .. 256"),
        (torch.tensor([[-1, 2]]), ValueError, "token ids must be in"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "length >= 1"),
        (torch.tensor([1, 2]), ValueError, r"\(batch, length >= 1\)"),
    ],
)
def test_bad_input_ids(ids, error, match):
    with pytest.raises(error, match=match):
        tiny()(ids)


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown preset 'H3-7B'"):
        H3Config.preset("H3-7B")
    with pytest.raises(ValueError, match="attn_layer_idx"):
        H3Config(n_layer=2, attn_layer_idx=(5,))
    with pytest.raises(ValueError, match="ssm_mixer"):
        H3Config(ssm_mixer="mamba")


def test_presets_match_the_published_table():
    shapes = {name: (c.d_model, c.n_layer, c.n_head, c.attn_layer_idx, c.rotary_dim) for name, c in PRESETS.items()}
    assert shapes["H3-125M"] == (768, 12, 12, (6,), 0)
    assert shapes["H3-355M"] == (1024, 24, 16, (8, 16), 0)
    assert shapes["H3-1.3B"] == (2048, 24, 16, (8, 16), 0)
    assert shapes["H3-2.7B"] == (2560, 32, 20, (8, 16, 24), 0)
    assert shapes["H3-2.7B-rotary"] == (2560, 32, 20, (10, 21), 64)


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch):
    # The submodule itself: huggingface_hub loads its attributes lazily, so `hub.constants` may not exist yet.
    constants = pytest.importorskip("huggingface_hub.constants")
    # Offline mode makes huggingface_hub refuse at once instead of retrying a network that is not there.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="'danfu09/H3-125M' is no local file or folder, and the Hugging Face Hub.*"
                       "offline"):  # fmt: skip
        H3LM.from_pretrained("danfu09/H3-125M")


@pytest.mark.parametrize("name", ["model.pt", "runs/demo/typo", "./typo", "../typo", "typo.bin"])
def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{name}: no such file or directory"):
        H3LM.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="no such file"):
        H3LM.from_pretrained(str(tmp_path / name))
