"""The state cache: longest-prefix lookup, LRU eviction within a byte budget, compact copies that stay values."""

import pytest
import torch

from hippos import H3LM, H3Config, LMState
from hippos.serving import StateCache
from hippos.serving.cache import KEY_BYTES_PER_TOKEN, compact_copy, state_bytes
from tolerances import assert_close

VOCAB = 61
LAYOUTS = {"h3": (), "hybrid": (1,), "transformer": (0, 1)}


def tiny(layout: str = "hybrid") -> H3LM:
    torch.manual_seed(0)
    return H3LM(H3Config.preset("tiny", attn_layer_idx=LAYOUTS[layout], vocab_size=VOCAB)).double().eval()


def state_after(model: H3LM, tokens, state: LMState | None = None) -> LMState:
    with torch.inference_mode():
        return model(torch.tensor([list(tokens)]), state=state, return_state=True).state


def snapshot(state: LMState) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in state.to_tensors().items()}


def assert_same(state: LMState, tensors: dict[str, torch.Tensor]) -> None:
    now = state.to_tensors()
    assert now.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(now[name], t), f"{name} changed"


def entry_bytes(state: LMState, key) -> int:
    return state_bytes(state) + KEY_BYTES_PER_TOKEN * len(key)


def test_lookup_finds_the_longest_cached_prefix():
    model = tiny("h3")
    cache = StateCache(1 << 24)
    for key in [(1, 2, 3), (1, 2, 3, 4, 5), (7,)]:
        assert cache.insert(key, state_after(model, key))
    n, state = cache.lookup((1, 2, 3, 4, 5, 6))
    assert n == 5
    assert_close(state.to_tensors()["0.diag"], state_after(model, (1, 2, 3, 4, 5)).to_tensors()["0.diag"], strict=True)
    assert cache.lookup([1, 2, 3, 4])[0] == 3
    assert cache.lookup((7, 1))[0] == 1
    assert cache.lookup((1, 2)) == (0, None)  # (1, 2, 3) is longer than the tokens asked for
    assert cache.lookup(()) == (0, None)
    assert (cache.hits, cache.misses, len(cache)) == (3, 2, 3)


@pytest.mark.parametrize("layout", ["hybrid", "transformer"])
def test_cached_state_continues_like_the_original(layout):
    model = tiny(layout)
    prompt, more = (5, 9, 2, 44, 17), torch.tensor([[3, 8, 1]])
    original = state_after(model, prompt)
    cache = StateCache(1 << 24)
    cache.insert(prompt, original)
    _, cached = cache.lookup(prompt + (0,))
    with torch.inference_mode():
        want = model(more, state=original).logits
        got = model(more, state=cached).logits
    assert_close(got, want, strict=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_state_is_a_value(layout):
    """Neither the request that inserted a state nor one that continues from it may change the cached copy."""
    model = tiny(layout)
    prompt = (5, 9, 2, 44, 17, 30)
    original = state_after(model, prompt)
    cache = StateCache(1 << 24)
    cache.insert(prompt, original)
    _, cached = cache.lookup(prompt + (1,))
    kept = snapshot(cached)
    with torch.inference_mode():
        _, s = model.step(torch.tensor([4]), original)  # the inserting request goes on
        model.step(torch.tensor([9]), cached)  # a branch
        s = state_after(model, (8, 8, 8), cached)  # a chunked prefill, then decoding
        for token in (4, 7, 11):
            _, s = model.step(torch.tensor([token]), s)
        batch = LMState.concat([state_after(model, (1, 2)), cached])  # joined into a running batch
        for token in (4, 7):
            _, batch = model.step(torch.tensor([token, token]), batch)
    assert_same(cached, kept)
    assert_same(cache.lookup(prompt)[1], kept)


def test_copies_are_compact_and_bytes_are_counted():
    """Spare KV capacity and slots before a row's start are dropped; cache.bytes is what the copies hold."""
    model = tiny("hybrid")
    with torch.inference_mode():
        long = state_after(model, range(1, 12))
        short = state_after(model, (3, 4, 5))
        _, batch = model.step(torch.tensor([6, 6]), LMState.concat([long, short]))  # grows the KV buffers
    row = batch.select([1])  # right-aligned: the short row starts at slot 8 of 12
    copy = compact_copy(row)
    assert copy[1].to_tensors()["k"].shape[2] == 4
    for t in copy.to_tensors().values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    cache = StateCache(1 << 24)
    cache.insert((3, 4, 5, 6), row)
    cache.insert(tuple(range(1, 12)), long)
    assert cache.bytes == entry_bytes(copy, (3, 4, 5, 6)) + entry_bytes(compact_copy(long), range(1, 12))
    with torch.inference_mode():  # the copy continues like the row it came from
        assert_close(model.step(torch.tensor([9]), copy)[0], model.step(torch.tensor([9]), row)[0], strict=True)


def test_least_recently_used_goes_first():
    model = tiny("h3")  # fixed-size states: every entry with a 2-token key has the same size
    states = {key: state_after(model, key) for key in [(1, 2), (3, 4), (5, 6), (7, 8)]}
    size = entry_bytes(states[(1, 2)], (1, 2))
    cache = StateCache(2 * size + size // 2)
    cache.insert((1, 2), states[(1, 2)])
    cache.insert((3, 4), states[(3, 4)])
    assert cache.lookup((1, 2, 9))[0] == 2  # (1, 2) is now the most recently used
    cache.insert((5, 6), states[(5, 6)])
    assert (1, 2) in cache and (5, 6) in cache and (3, 4) not in cache
    assert cache.bytes == 2 * size
    cache.insert((1, 2), states[(1, 2)])  # present: only marked as used
    cache.insert((7, 8), states[(7, 8)])
    assert (1, 2) in cache and (7, 8) in cache and (5, 6) not in cache
    assert len(cache) == 2 and cache.bytes == 2 * size
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 and cache.lookup((1, 2, 3)) == (0, None)


def test_a_state_larger_than_the_budget_is_not_kept():
    model = tiny("h3")
    state = state_after(model, (1, 2, 3))
    cache = StateCache(entry_bytes(state, (1, 2, 3)) - 1)
    assert not cache.insert((1, 2, 3), state)
    assert len(cache) == 0 and cache.bytes == 0
    assert not StateCache(0).insert((1, 2, 3), state)
    assert StateCache(entry_bytes(state, (1, 2, 3))).insert((1, 2, 3), state)


def test_bad_arguments_are_refused():
    model = tiny("h3")
    with pytest.raises(ValueError, match="budget_bytes"):
        StateCache(-1)
    cache = StateCache(1 << 20)
    with pytest.raises(ValueError, match="at least one token"):
        cache.insert((), state_after(model, (1,)))
    with torch.inference_mode():
        two_rows = model(torch.tensor([[1, 2], [3, 4]]), return_state=True).state
    with pytest.raises(ValueError, match="one row"):
        cache.insert((1, 2), two_rows)


def test_thousands_of_keys_and_hash_collisions():
    model = tiny("h3")
    state = state_after(model, (1,))
    g = torch.Generator().manual_seed(3)
    text = tuple(torch.randint(0, VOCAB, (2000,), generator=g).tolist())
    other = tuple((t + 1) % VOCAB for t in text)
    cache = StateCache(1 << 30)
    for n in range(1, len(text) + 1, 2):  # 1000 prefixes of `text`, keys of 1000 different lengths
        cache.insert(text[:n], state)
    assert len(cache) == 1000
    assert cache.lookup(text + (5,))[0] == 1999
    assert cache.lookup(text[:1200] + ((text[1200] + 1) % VOCAB,))[0] == 1199
    assert cache.lookup(other) == (0, None)
    # With a hash that is the key's last token, (1, 2) and (3, 2) collide: tokens must be compared.
    clash = StateCache(1 << 20)
    clash._hash = lambda tokens, length, chain: tokens[length - 1]
    assert clash.insert((1, 2), state)
    assert not clash.insert((3, 2), state)  # same length and hash as a kept key: not kept
    assert clash.lookup((3, 2, 5)) == (0, None)
    assert clash.lookup((1, 2, 5))[0] == 2
