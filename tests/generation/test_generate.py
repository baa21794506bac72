"""Generation: greedy and sampled decoding, EOS, left-padded batches, streaming, saved states."""

import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hippos import H3LM, H3Config, LMState, generate
from hippos.generation import Sampling, TextStreamer, filter_logits, load_state, sample_next, save_state, stream

VARIANTS = {
    "h3": {"attn_layer_idx": ()},
    "hybrid": {"attn_layer_idx": (1,)},
    "rotary-hybrid": {"attn_layer_idx": (1,), "rotary_dim": 8},
    "transformer": {"attn_layer_idx": (0, 1)},
}


def tiny(variant="hybrid"):
    torch.manual_seed(0)
    return H3LM(H3Config.preset("tiny", **VARIANTS[variant])).eval()


def greedy_by_full_forward(model, ids, n):
    """Reference: recompute the whole sequence for every new token."""
    for _ in range(n):
        logits = model(ids).logits[:, -1, : model.config.vocab_size]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_equals_recomputing_everything(variant):
    model = tiny(variant).double()
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        expected = greedy_by_full_forward(model, ids, 12)
    assert torch.equal(generate(model, ids, 12, temperature=0), expected)
    assert torch.equal(generate(model, ids, 12, top_k=1), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_one_by_one(variant):
    model = tiny(variant).double()
    prompts = [torch.randint(0, 257, (n,)) for n in (9, 4, 6)]
    longest = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(longest - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(longest - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    batched = generate(model, ids, 10, temperature=0, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], 10, temperature=0)
        assert torch.equal(batched[row, longest:], alone[0, len(p) :])


def test_eos_stops_each_sequence_and_the_batch():
    model = tiny()
    ids = torch.randint(0, 257, (3, 5))
    free = generate(model, ids, 15, temperature=0)
    eos = int(free[0, 7])  # the third token of sequence 0
    out = generate(model, ids, 15, temperature=0, eos_token_id=eos)
    for row in range(3):
        new = out[row, 5:]
        hits = (new == eos).nonzero()
        if len(hits):
            first = int(hits[0])
            assert torch.all(new[first:] == eos)  # finished sequences are filled with EOS
            assert torch.equal(new[:first], free[row, 5 : 5 + first])
    all_done = (out[:, 5:] == eos).any(1).all()
    assert out.shape[1] == 20 or all_done


def test_sampling_is_reproducible_and_respects_top_k():
    model = tiny()
    ids = torch.randint(0, 257, (2, 5))
    a = generate(model, ids, 20, top_k=3, generator=torch.Generator().manual_seed(5))
    b = generate(model, ids, 20, top_k=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # Every sampled token was among the 3 most likely at its step.
    logits = model(a[:, :-1]).logits[:, 4:, : model.config.vocab_size]
    top3 = logits.topk(3, -1).indices
    assert torch.all((top3 == a[:, 5:, None]).any(-1))


def test_padding_ids_are_never_sampled():
    logits = torch.full((4, 264), -10.0)
    logits[:, 257:] = 100.0  # the padded part of the vocabulary is the most likely
    for kw in ({"temperature": 0}, {"temperature": 1.0}, {"top_p": 0.5}, {"top_k": 3}):
        assert torch.all(sample_next(logits, 257, **kw) < 257)


def test_filter_logits_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1  # the top token always stays


def test_streaming_yields_the_tokens_generate_returns():
    model = tiny()
    ids = torch.randint(0, 257, (2, 6))
    streamed = list(stream(model, ids, 7, Sampling(temperature=0)))
    assert torch.equal(torch.stack(streamed, 1), generate(model, ids, 7, temperature=0)[:, 6:])

    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, t):
            self.tokens.append(t)

        def end(self):
            self.ended = True

    collect = Collect()
    generate(model, ids, 7, temperature=0, streamer=collect)
    assert collect.ended and torch.equal(torch.stack(collect.tokens, 1), torch.stack(streamed, 1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_state_continues_like_the_whole_text(variant, tmp_path):
    model = tiny(variant)
    text = torch.randint(0, 257, (1, 20))
    whole = generate(model, text, 8, temperature=0)
    # First turn: read the first part and generate; save the state (it covers the generated tokens too).
    first, state = generate(model, text[:, :12], 3, temperature=0, return_state=True)
    save_state(state, tmp_path / "state.safetensors")
    restored = load_state(tmp_path / "state.safetensors")
    # Later: feed what followed; it must continue as if the whole text had been read at once.
    follow = text[:, 15:]
    again = generate(model, follow, 8, temperature=0, state=restored)
    reference = generate(model, torch.cat([first, follow], 1), 8, temperature=0)
    assert torch.equal(again[:, follow.shape[1] :], reference[:, -8:])
    assert whole.shape == (1, 28)


def test_pure_h3_state_has_a_fixed_size(tmp_path):
    model = tiny("h3")
    shapes = []
    for length in (5, 60):
        _, state = generate(model, torch.randint(0, 257, (1, length)), 3, temperature=0, return_state=True)
        save_state(state, tmp_path / "state.safetensors")
        shapes.append({k: v.shape for k, v in load_file(tmp_path / "state.safetensors").items()})
    assert shapes[0] == shapes[1]


def test_state_file_names_each_layers_state_class_and_old_files_still_load(tmp_path):
    model = tiny("rotary-hybrid")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    _, state = generate(model, torch.randint(0, 257, (2, 5)), 3, temperature=0, attention_mask=mask, return_state=True)
    assert isinstance(state, LMState)
    save_state(state, tmp_path / "state.safetensors")
    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["state_types"]) == ["H3State", "AttentionState"]
    follow = torch.randint(0, 257, (2, 2))
    expected = generate(model, follow, 4, temperature=0, state=state)
    assert torch.equal(
        generate(model, follow, 4, temperature=0, state=load_state(tmp_path / "state.safetensors")), expected
    )
    # The first file format: layer kinds, and an attention layer's starts named "pad".
    old = {k.replace(".start", ".pad"): v.contiguous() for k, v in state.to_tensors().items()}
    save_file(old, tmp_path / "old.safetensors", metadata={"kinds": json.dumps(["h3", "attention"])})
    assert torch.equal(
        generate(model, follow, 4, temperature=0, state=load_state(tmp_path / "old.safetensors")), expected
    )
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a hippos generation state"):
        load_state(tmp_path / "other.safetensors")


def test_text_streamer_holds_back_partial_characters():
    class Bytes:  # token i is byte i
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    out = io.StringIO()
    streamer = TextStreamer(Bytes(), out)
    writes = []
    for byte in "hé!".encode():
        streamer.put(torch.tensor([byte]))
        writes.append(out.getvalue())
    streamer.end()
    assert writes == ["h", "h", "hé", "hé!"] and out.getvalue() == "hé!\n"


def test_reusing_a_saved_state_twice_gives_the_same_continuation():
    model = tiny("hybrid")
    _, state = generate(model, torch.randint(0, 257, (1, 10)), 2, temperature=0, return_state=True)
    follow = torch.randint(0, 257, (1, 4))
    a = generate(model, follow, 6, temperature=0, state=state)
    generate(model, torch.randint(0, 257, (1, 3)), 6, temperature=0, state=state)  # another branch
    b = generate(model, follow, 6, temperature=0, state=state)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": -2}, "max_new_tokens"),
    ],
)
def test_bad_generation_settings(kwargs, match):
    model = tiny()
    n = kwargs.pop("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1, 2]]), n, **kwargs)


def test_bad_prompts():
    model = tiny()
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(model, torch.tensor([[1, 999]]), 3)
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, torch.tensor([[1, 2]]), 3, attention_mask=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="left padding"):
        generate(model, torch.tensor([[1, 2, 3]]), 3, attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="the state holds 2 sequences but input_ids 1"):
        generate(model, torch.tensor([[1, 2]]), 3, state=model.init_state(2))
