"""The serving engine: continuous batching gives every request what generate gives it alone; cache, queue, errors.

Models are float64, so that batching and chunking change nothing but rounding far below any gap between logits,
and greedy tokens can be compared exactly. Every wait is bounded: a bug fails a test instead of hanging it.
"""

import threading
from contextlib import contextmanager

import pytest
import torch

from hippos import H3LM, H3Config, generate
from hippos.serving import CompletionRequest, Engine, EngineConfig, QueueFullError, TokenEvent

VOCAB = 61
LAYOUTS = {"h3": (), "hybrid": (1,), "transformer": (0, 1)}
WAIT_S = 30


def tiny(layout: str = "hybrid") -> H3LM:
    """A float64 model whose greedy tokens depend on the whole context, and on positions (rotary).

    At the default initialisation a tiny model repeats its last token whatever came before, so a request given
    the wrong state, or the wrong row, would still pass; larger weights make every token depend on the state.
    """
    torch.manual_seed(0)
    config = H3Config.preset("tiny", attn_layer_idx=LAYOUTS[layout], vocab_size=VOCAB, rotary_dim=16)
    model = H3LM(config).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0, 1.0 if isinstance(module, torch.nn.Embedding) else 0.5)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def prompt_of(length: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def alone(model: H3LM, prompt, max_tokens: int, **sampling) -> list[int]:
    """What generate gives this prompt on its own (greedy unless told)."""
    sampling.setdefault("temperature", 0)
    return generate(model, torch.tensor([prompt]), max_tokens, **sampling)[0, len(prompt) :].tolist()


class Collector:
    """A request's callback: keeps its events, marks the end, and runs `then(n)` after its n-th token."""

    def __init__(self, log: list | None = None, name: str = "", then=None):
        self.events: list[TokenEvent] = []
        self.done = threading.Event()
        self.log, self.name, self.then = log, name, then

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        if self.log is not None:
            self.log.append((self.name, event.finish_reason))
        if event.token is not None and self.then is not None:
            self.then(len(self.tokens))
        if event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.token is not None]

    def wait(self) -> TokenEvent:
        assert self.done.wait(WAIT_S), "the request did not finish in time"
        finals = [e for e in self.events if e.finish_reason is not None]
        assert len(finals) == 1 and finals[0] is self.events[-1], "exactly one finishing event, the last"
        return self.events[-1]


@contextmanager
def serving(model: H3LM, **config):
    engine = Engine(model, EngineConfig(**config))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop(drain=False, timeout=WAIT_S)


def greedy(prompt, max_tokens, **options) -> CompletionRequest:
    return CompletionRequest(prompt, max_tokens, temperature=0, **options)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_requests_joining_a_running_batch_get_what_generate_gives_them_alone(layout):
    """Prompts of 7 and 13 tokens are prefilled in chunks of 4 while the batch decodes."""
    model = tiny(layout)
    specs = {"a": (7, 12), "b": (2, 9), "c": (13, 6), "d": (5, 10)}  # name: (prompt length, max_tokens)
    prompts = {name: prompt_of(n, seed) for seed, (name, (n, _)) in enumerate(specs.items())}
    expected = {name: alone(model, prompts[name], specs[name][1]) for name in specs}
    order: list = []
    with serving(model, prefill_chunk=4) as engine:
        submit = lambda name: engine.submit(greedy(prompts[name], specs[name][1]), got[name])  # noqa: E731
        got = {name: Collector(order, name) for name in specs}
        # b and c arrive while a runs (after its 2nd token), d while b runs: submitted from the callbacks.
        got["a"].then = lambda n: n == 2 and (submit("b"), submit("c"))
        got["b"].then = lambda n: n == 3 and submit("d")
        submit("a")
        finals = {name: c.wait() for name, c in got.items()}
    for name in specs:
        assert got[name].tokens == expected[name], name
        assert finals[name].finish_reason == "length" and finals[name].prompt_tokens == specs[name][0]
    assert order.index(("b", None)) < order.index(("a", "length")), "b should have joined while a was running"
    assert order.index(("d", None)) < order.index(("b", "length"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_cancelled_row_leaves_without_disturbing_the_others(layout):
    model = tiny(layout)
    prompts = [prompt_of(n, seed) for seed, n in enumerate((6, 11, 3))]
    limits = [14, 40, 9]
    handles = {}
    got = [Collector() for _ in prompts]
    got[1].then = lambda n: n == 3 and handles[1].cancel()  # the middle row cancels itself after 3 tokens
    engine = Engine(model, EngineConfig())
    for i, (p, m) in enumerate(zip(prompts, limits)):  # queued before the start: one batch from the first step
        handles[i] = engine.submit(greedy(p, m), got[i])
    engine.start()
    try:
        finals = [c.wait() for c in got]
    finally:
        engine.stop(drain=False, timeout=WAIT_S)
    assert finals[1].finish_reason == "cancelled" and finals[1].token is None
    assert got[1].tokens == alone(model, prompts[1], 3)
    for i in (0, 2):
        assert finals[i].finish_reason == "length"
        assert got[i].tokens == alone(model, prompts[i], limits[i])
    handles[1].cancel()  # idempotent, and too late to matter
    assert engine.stats().requests_finished == {"stop": 0, "length": 2, "cancelled": 1, "error": 0}


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch():
    model = tiny("hybrid")
    prompt = prompt_of(6, 0)
    request = CompletionRequest(prompt, 12, temperature=0.9, top_p=0.95, seed=7)
    with serving(model) as engine:
        solo = Collector()
        engine.submit(request, solo)
        solo.wait()
        others = [Collector() for _ in range(4)]
        for i, c in enumerate(others):  # greedy and unseeded sampled neighbours, some joining later
            engine.submit(CompletionRequest(prompt_of(3 + 2 * i, 10 + i), 20, temperature=i % 2), c)
        busy = Collector()
        engine.submit(request, busy)
        reseeded = Collector()
        engine.submit(CompletionRequest(prompt, 12, temperature=0.9, top_p=0.95, seed=8), reseeded)
        for c in [*others, busy, reseeded]:
            c.wait()
    seeded = torch.Generator().manual_seed(7)
    assert solo.tokens == busy.tokens == alone(model, prompt, 12, temperature=0.9, top_p=0.95, generator=seeded)
    assert reseeded.tokens != solo.tokens  # the seed is used


def test_a_stop_token_is_emitted_and_ends_the_request():
    model = tiny("h3")
    prompt = prompt_of(5, 1)
    free = alone(model, prompt, 12)
    stop = free[4]
    with serving(model) as engine:
        got = Collector()
        engine.submit(greedy(prompt, 12, stop_token_ids={stop, VOCAB + 5}), got)
        final = got.wait()
    assert final.finish_reason == "stop" and final.token == stop
    assert got.tokens == free[: free.index(stop) + 1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_follow_up_prefills_only_its_new_tokens(layout):
    """The first request runs beside a longer one, so its cached attention row started after slot 0."""
    model = tiny(layout)
    prompt, new, longer = prompt_of(8, 2), prompt_of(4, 3), prompt_of(15, 4)
    with serving(model, prefill_chunk=5) as engine:
        first, neighbour = Collector(), Collector()
        engine.submit(greedy(longer, 12), neighbour)
        engine.submit(greedy(prompt, 6), first)
        first.wait()
        kept = {key: _copied(entry.state) for key, entry in engine.cache._entries.items()}
        follow_up = prompt + tuple(first.tokens) + new
        second = Collector()
        engine.submit(greedy(follow_up, 7), second)
        second.wait()
        neighbour.wait()
        stats = engine.stats()
        # The follow-up decoded in place from a cached state: no cached tensor changed (states are values).
        for key, tensors in kept.items():
            assert all(torch.equal(t, tensors[n]) for n, t in engine.cache._entries[key].state.to_tensors().items())
    with serving(model, cache_bytes=0) as engine:
        fresh = Collector()
        engine.submit(greedy(follow_up, 7), fresh)
        fresh.wait()
        assert engine.stats().cache_hits == 0 and engine.stats().cache_entries == 0
    assert {e.cached_tokens for e in second.events} == {len(prompt) + 6 - 1}
    assert {e.cached_tokens for e in first.events} == {0}
    assert second.tokens == fresh.tokens == alone(model, follow_up, 7)
    # The follow-up ran the completion's last token and the new ones; the others ran their whole prompts.
    assert stats.prefilled_tokens == len(longer) + len(prompt) + 1 + len(new)
    assert stats.prompt_tokens == len(longer) + len(prompt) + len(follow_up)
    assert (stats.cache_hits, stats.cache_misses) == (1, 2)
    assert stats.cache_entries == 6 and stats.cache_bytes > 0  # each request: its prompt, its prompt + completion


def _copied(state) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in state.to_tensors().items()}


def test_the_queue_is_bounded_and_stop_drains_it():
    model = tiny("h3")
    engine = Engine(model, EngineConfig(max_queue=2, max_running=1))
    got = [Collector(), Collector()]
    engine.submit(greedy(prompt_of(4, 0), 5), got[0])
    engine.submit(greedy(prompt_of(6, 1), 7), got[1])
    with pytest.raises(QueueFullError, match="max_queue"):
        engine.submit(greedy(prompt_of(3, 2), 5), Collector())
    assert engine.stats().queued == 2
    engine.start()
    engine.stop(drain=True, timeout=WAIT_S)
    assert [c.wait().finish_reason for c in got] == ["length", "length"]
    assert [len(c.tokens) for c in got] == [5, 7]
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(greedy(prompt_of(3, 2), 5), Collector())
    stats = engine.stats()
    assert (stats.queued, stats.running, stats.generated_tokens) == (0, 0, 12)


def test_stop_without_drain_cancels_everything():
    model = tiny("hybrid")
    engine = Engine(model, EngineConfig(max_running=2))
    started = threading.Event()
    got = [Collector(then=lambda n: started.set()) for _ in range(3)]
    for i, c in enumerate(got):
        engine.submit(greedy(prompt_of(4, i), 100_000), c)
    engine.start()
    assert started.wait(WAIT_S)
    engine.stop(drain=False, timeout=WAIT_S)
    assert [c.wait().finish_reason for c in got] == ["cancelled"] * 3
    assert len(got[2].tokens) == 0  # it was still waiting for a row


def test_never_more_rows_than_max_running():
    model = tiny("transformer")
    engine = Engine(model, EngineConfig(max_running=2, prefill_chunk=4))
    seen = []
    prompts = [prompt_of(3 + i, i) for i in range(5)]
    got = [Collector(then=lambda n: seen.append(engine.stats().running)) for _ in prompts]
    for p, c in zip(prompts, got):
        engine.submit(greedy(p, 6), c)
    engine.start()
    try:
        for p, c in zip(prompts, got):
            c.wait()
            assert c.tokens == alone(model, p, 6)
    finally:
        engine.stop(drain=False, timeout=WAIT_S)
    assert max(seen) == 2


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(monkeypatch):
    """The step fails in its second block, after the first block's state was replaced in place: the half-advanced
    batch is dropped with its requests, and the next request decodes as it would alone."""
    model = tiny("hybrid")
    block = model.backbone.layers[1]
    real_step, calls = block.step, []

    def step_failing_once(x, state, **kw):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real_step(x, state, **kw)

    monkeypatch.setattr(block, "step", step_failing_once)
    with serving(model) as engine:
        failed = Collector()
        engine.submit(greedy(prompt_of(5, 0), 8), failed)
        final = failed.wait()
        later = Collector()
        engine.submit(greedy(prompt_of(5, 1), 8), later)
        later.wait()
        finished = engine.stats().requests_finished
    assert final.finish_reason == "error" and "out of memory (simulated)" in final.error
    assert len(failed.tokens) == 1  # its first token came from the prefill, before the failed step
    monkeypatch.setattr(block, "step", real_step)
    assert later.tokens == alone(model, prompt_of(5, 1), 8)
    assert finished["error"] == 1 and finished["length"] == 1


def test_a_failed_prefill_or_callback_fails_only_its_request(monkeypatch):
    model = tiny("h3")
    real, calls = model.hidden_states, []

    def failing_on_long_prompts(ids, *args, **kwargs):
        calls.append(ids.shape[1])
        if ids.shape[1] == 9:
            raise ValueError("this prompt cannot be run (simulated)")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing_on_long_prompts)

    def raising(event):
        raise KeyError("client gone")

    with serving(model) as engine:
        bad_prefill, bad_callback, good = Collector(), Collector(then=raising), Collector()
        engine.submit(greedy(prompt_of(9, 0), 5), bad_prefill)
        engine.submit(greedy(prompt_of(4, 1), 5), bad_callback)
        engine.submit(greedy(prompt_of(4, 2), 5), good)
        results = [c.wait() for c in (bad_prefill, bad_callback, good)]
    assert results[0].finish_reason == "error" and "simulated" in results[0].error
    assert results[1].finish_reason == "error" and "KeyError" in results[1].error
    assert len(bad_callback.tokens) == 1
    monkeypatch.setattr(model, "hidden_states", real)
    assert results[2].finish_reason == "length" and good.tokens == alone(model, prompt_of(4, 2), 5)


def test_stats_count_tokens_and_finished_requests():
    model = tiny("h3")
    with serving(model, cache_bytes=0) as engine:
        got = [Collector() for _ in range(3)]
        for i, c in enumerate(got):
            engine.submit(CompletionRequest(prompt_of(4 + i, i), 6, temperature=1.0, seed=i), c)
        for c in got:
            c.wait()
        stats = engine.stats()
    assert stats.prompt_tokens == stats.prefilled_tokens == 4 + 5 + 6
    assert stats.generated_tokens == 18 and stats.tokens_per_second > 0
    assert stats.requests_finished["length"] == 3
    assert (stats.queued, stats.running, stats.cache_hits, stats.cache_misses, stats.cache_bytes) == (0, 0, 0, 0, 0)


def test_requests_and_configs_are_checked():
    assert CompletionRequest([1, 2], 3).prompt == (1, 2)
    assert CompletionRequest(torch.tensor([4, 5]), 1, stop_token_ids=[0]).prompt == (4, 5)
    bad = [
        ({"prompt": (), "max_tokens": 1}, "at least one"),
        ({"prompt": (1, 2.5), "max_tokens": 1}, "token ids"),
        ({"prompt": (True,), "max_tokens": 1}, "token ids"),
        ({"prompt": (-1,), "max_tokens": 1}, "prompt"),
        ({"prompt": (1,), "max_tokens": 0}, "max_tokens"),
        ({"prompt": (1,), "max_tokens": 1, "temperature": -0.5}, "temperature"),
        ({"prompt": (1,), "max_tokens": 1, "temperature": float("nan")}, "temperature"),
        ({"prompt": (1,), "max_tokens": 1, "top_p": 0.0}, "top_p"),
        ({"prompt": (1,), "max_tokens": 1, "seed": -3}, "seed"),
        ({"prompt": (1,), "max_tokens": 1, "stop_token_ids": {-2}}, "stop_token_ids"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            CompletionRequest(**fields)
    for fields in [{"max_running": 0}, {"max_queue": 0}, {"prefill_chunk": 0}, {"cache_bytes": -1}]:
        with pytest.raises(ValueError, match=next(iter(fields))):
            EngineConfig(**fields)
    with pytest.raises(TypeError, match="H3LM"):
        Engine(torch.nn.Linear(2, 2))
    engine = Engine(tiny("h3"))
    with pytest.raises(ValueError, match="vocabulary size 61"):
        engine.submit(CompletionRequest((3, VOCAB), 2), Collector())
    engine.stop()
