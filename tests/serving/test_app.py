"""The HTTP app: OpenAI's own client against a real uvicorn server on a thread of this process, and raw HTTP for
bad requests, limits, keys and disconnects; plus the pieces beneath (request checks, incremental text, metrics).

The served model is float64, so the engine's greedy tokens can be compared exactly with `hippos.generate`.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from hippos import H3LM, generate  # noqa: E402
from hippos.data import ByteTokenizer  # noqa: E402
from hippos.serving import EngineStats  # noqa: E402
from hippos.serving.metrics import Metrics  # noqa: E402
from hippos.serving.protocol import APIError, CompletionText, parse_completion  # noqa: E402
from hippos.serving.server import ServeConfig, build_app  # noqa: E402

TOK = ByteTokenizer()
LIMITS = {"max_prompt_tokens": 64, "max_tokens": 5000, "max_body_bytes": 4096}
LONG = {"model": "tiny", "max_tokens": 5000, "temperature": 0}  # greedy: no EOS, seconds of decoding


class ThreadServer:
    """`build_app` under uvicorn on a daemon thread, on 127.0.0.1 and a port the system picks."""

    def __init__(self, model: H3LM, config: ServeConfig, wait_until):
        self.app = build_app(model, TOK, "tiny", config)
        self.engine = self.app.state.engine
        uv = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.wait_until = wait_until

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        self.wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        assert self.server.started, "the server did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def model(served_model_dir) -> H3LM:
    return H3LM.from_pretrained(served_model_dir).double()


@pytest.fixture(scope="module")
def server(served_model_dir, web):
    served = H3LM.from_pretrained(served_model_dir).double()  # its own copy: the engine thread owns it
    config = ServeConfig(port=0, max_running=4, max_queue=8, cache_bytes=1 << 24, **LIMITS)
    with ThreadServer(served, config, web.wait_until) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    base = f"http://127.0.0.1:{server.port}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server, web):
    return web.Http(server.port)


def greedy_text(model: H3LM, prompt: str, n: int) -> tuple[str, str]:
    """(text, finish reason) that generate gives greedily: EOS stops it and is not printed."""
    ids = generate(model, torch.tensor([TOK.encode(prompt)]), n, temperature=0, eos_token_id=TOK.eos_token_id)
    new = ids[0, len(TOK.encode(prompt)) :].tolist()
    return TOK.decode(new), "stop" if TOK.eos_token_id in new else "length"


# ---- OpenAI's client against the server ----------------------------------------------------------------------
def test_greedy_completion_equals_generate(client, model):
    out = client.completions.create(model="tiny", prompt="Hippos ", max_tokens=12, temperature=0)
    text, reason = greedy_text(model, "Hippos ", 12)
    assert out.choices[0].text == text and out.choices[0].finish_reason == reason
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny"
    assert out.usage.prompt_tokens == 7 and out.usage.total_tokens == 7 + out.usage.completion_tokens
    assert out.usage.completion_tokens == 12 or reason == "stop"


def test_streaming_gives_the_same_text_then_usage(client, model):
    stream = client.completions.create(model="tiny", prompt="Hippos ", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text, reason = greedy_text(model, "Hippos ", 12)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2] if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 7


def test_token_ids_prompt_equals_text_prompt(client):
    ask = {"model": "tiny", "max_tokens": 8, "temperature": 0}
    by_text = client.completions.create(prompt="abc", **ask).choices[0].text
    by_ids = client.completions.create(prompt=list(b"abc"), **ask).choices[0].text
    assert by_ids == by_text


def test_seed_reproduces_sampling(client):
    def sample(seed: int) -> str:
        out = client.completions.create(model="tiny", prompt="x", max_tokens=16, temperature=1.0, seed=seed)
        return out.choices[0].text

    first = sample(5)
    assert sample(5) == first
    assert any(sample(seed) != first for seed in (6, 7))


def test_stop_string_cuts_the_text_whole_and_streamed(client):
    ask = {"model": "tiny", "prompt": "Hello", "max_tokens": 40, "temperature": 1.0, "seed": 3}
    full = client.completions.create(**ask).choices[0].text
    stop = full[6:8]
    expected = full[: full.index(stop)]
    out = client.completions.create(stop=stop, **ask)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=[stop, "\x00never"], stream=True, **ask))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_usage_counts_cached_tokens_of_a_resent_conversation(client, model):
    prompt = list(b"A conversation that is resent")
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    new = generate(model, torch.tensor([prompt]), 4, temperature=0)[0, len(prompt) :].tolist()
    assert TOK.eos_token_id not in new  # else the engine would not have run (and cached) all four
    # The engine keeps the state after the prompt and after the prompt plus all new tokens but the last.
    resent = prompt + new + list(b" and more")
    again = client.completions.create(model="tiny", prompt=resent, max_tokens=2, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert len(prompt) + 3 <= cached < len(resent)
    assert again.usage.prompt_tokens == len(resent)


def test_models_health_and_metrics(client, http):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert http.request("GET", "/health")[::2] == (200, {"status": "ok"})
    client.completions.create(model="tiny", prompt="m", max_tokens=3, temperature=0)
    status, headers, text = http.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = http.metrics()
    for name in ("queue_requests", "running_requests", "tokens_per_second", "state_cache_bytes",
                 "state_cache_entries", "cached_prompt_tokens_total", "state_cache_hits_total"):  # fmt: skip
        assert f"hippos_{name}" in values, name
    assert values["hippos_generated_tokens_total"] >= 3 and values["hippos_state_cache_bytes"] > 0
    assert values['hippos_http_responses_total{status="200"}'] >= 2


def test_client_sees_openai_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=3)


# ---- bad requests over raw HTTP: 400 with an OpenAI-style body, and the server goes on -----------------------
BAD = {
    "malformed": (b'{"model": "tiny", "prompt": "x",', None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, "JSON object"),
    "unknown field": ({"prompt": "x", "max_token": 5}, "max_token", "unknown field"),
    "missing prompt": ({}, "prompt", "required"),
    "temperature": ({"prompt": "x", "temperature": 2.5}, "temperature", "less than or equal to 2"),
    "top_p 0": ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    "max_tokens 0": ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    "max_tokens over the limit": ({"prompt": "x", "max_tokens": 5001}, "max_tokens", "limit of 5000"),
    "max_tokens a string": ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
    "n": ({"prompt": "x", "n": 2}, "n", "one completion"),
    "echo": ({"prompt": "x", "echo": True}, "echo", "not supported"),
    "five stops": ({"prompt": "x", "stop": list("abcde")}, "stop", "at most 4"),
    "prompt of strings": ({"prompt": ["a", "b"]}, "prompt", "string or a list of token ids"),
    "empty prompt": ({"prompt": ""}, "prompt", "empty"),
    "token id out of range": ({"prompt": [1, 257]}, "prompt", "[0, 257)"),
    "prompt too long": ({"prompt": "x" * 65}, "prompt", "at most 64"),
    "stream_options alone": ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    "negative seed": ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_request_gets_400_and_the_server_goes_on(http, case):
    body, param, words = BAD[case]
    if isinstance(body, dict):
        body = {"model": "tiny", **body}
    status, _, reply = http.complete(body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert words in reply["error"]["message"]
    assert http.request("GET", "/health")[0] == 200


def test_unknown_route_and_model_are_404(http):
    status, _, reply = http.complete({"model": "nope", "prompt": "x"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    status, _, reply = http.request("GET", "/v2/chat")
    assert status == 404 and "POST /v1/completions" in reply["error"]["message"]


def test_body_over_the_limit_is_413(http):
    conn = http.connect()  # a declared length over the limit is refused before the body is read
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10_000_000))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"at most 4096" in resp.read()
    conn.close()
    conn = http.connect()  # no declared length (an iterable body goes chunked): counted as it is read
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"x" * 5000, b'"}']), headers=http.headers())
    resp = conn.getresponse()
    assert resp.status == 413 and resp.read()
    conn.close()
    assert http.request("GET", "/health")[0] == 200


def test_client_that_disconnects_leaves_the_batch(server, http, web):
    finished = server.engine.stats().requests_finished["cancelled"]
    conn = http.connect()  # not streamed: the server notices the closed connection while it waits
    conn.request("POST", "/v1/completions", body=json.dumps({**LONG, "prompt": "x"}), headers=http.headers())
    web.wait_until(lambda: server.engine.stats().running == 1, "the request to run")
    conn.close()
    web.wait_until(lambda: server.engine.stats().running == 0, "the request to leave the batch")
    assert server.engine.stats().requests_finished["cancelled"] == finished + 1
    conn, resp = http.open_stream({**LONG, "prompt": "y"})
    assert resp.status == 200 and web.read_events(resp, limit=2)
    conn.close()
    web.wait_until(lambda: server.engine.stats().running == 0, "the streamed request to leave the batch")
    assert server.engine.stats().requests_finished["cancelled"] == finished + 2


# ---- the API key: 401 without it or with a wrong one; /health stays open --------------------------------------
def test_api_key_is_required_on_every_route_but_health(served_model_dir, web):
    served = H3LM.from_pretrained(served_model_dir)
    config = ServeConfig(port=0, api_key="sekret", max_running=1, max_queue=1, **LIMITS)
    with ThreadServer(served, config, web.wait_until) as running:
        http = web.Http(running.port, api_key="sekret")
        for path in ("/v1/models", "/metrics"):
            status, headers, reply = http.request("GET", path, auth=False)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key"
            assert headers["www-authenticate"] == "Bearer"
        wrong = http.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"}, auth=False)
        assert wrong[0] == 401 and "incorrect" in wrong[2]["error"]["message"]
        assert http.request("GET", "/health", auth=False)[0] == 200
        assert http.request("GET", "/v1/models")[0] == 200
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{running.port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=2)


# ---- the pieces beneath: request checks, incremental text with stop strings, metrics --------------------------
def test_parse_completion_takes_openai_defaults():
    body = parse_completion(b'{"model": "m", "prompt": [1, 2], "max_tokens": null, "temperature": null, "user": "u"}')
    assert body.prompt == [1, 2] and body.max_tokens is None and body.stop_strings() == ()
    assert parse_completion(b'{"model": "m", "prompt": "x", "stop": "\\n"}').stop_strings() == ("\n",)
    with pytest.raises(APIError) as err:
        parse_completion(b'{"model": "m", "prompt": "x", "temperature": true}')
    assert err.value.status == 400 and err.value.param == "temperature"


def feed(text: CompletionText, data: bytes) -> list[str]:
    """Push data one byte token at a time; the deltas, the flush last."""
    return [text.push(b) for b in data] + [text.flush()]


def test_text_never_splits_a_character():
    data = "héllo €𝄞!".encode()
    deltas = feed(CompletionText(TOK), data)
    assert "".join(deltas) == data.decode() and not any("\ufffd" in d for d in deltas)
    broken = feed(CompletionText(TOK), b"a\xe2\x82b")  # a character that never completes shows as U+FFFD
    assert "".join(broken) == TOK.decode(list(b"a\xe2\x82b"))


def test_stop_string_is_never_sent_even_in_part():
    text = CompletionText(TOK, stops=("STOP",), skip_ids=frozenset({256}))
    deltas = feed(text, b"abcSTOPdef")
    assert "".join(deltas) == "abc" and text.stopped and all("S" not in d for d in deltas)
    almost = CompletionText(TOK, stops=("STOP",))
    deltas = feed(almost, b"xSTOx")  # held back while it could still become the stop string, then sent
    assert deltas[2:4] == ["", ""] and "".join(deltas) == "xSTOx" and not almost.stopped
    earliest = CompletionText(TOK, stops=("cd", "b"))
    assert "".join(feed(earliest, b"abcd")) == "a"
    eos = CompletionText(TOK, skip_ids=frozenset({256}))
    assert eos.push(256) == "" and eos.push(ord("z")) == "z"


class FixedStats:
    """An engine stand-in for the metrics: stats() returns one fixed snapshot."""

    def stats(self) -> EngineStats:
        return EngineStats(queued=2, running=3, prompt_tokens=100, prefilled_tokens=60, generated_tokens=50,
                           tokens_per_second=12.5, cache_hits=4, cache_misses=1, cache_entries=5, cache_bytes=4096,
                           requests_finished={"stop": 1, "length": 2, "cancelled": 0, "error": 0})  # fmt: skip


def test_metrics_read_the_engine_at_scrape():
    metrics = Metrics(FixedStats())
    metrics.count_response(429)
    text = metrics.render()[0].decode()
    for line in ("hippos_queue_requests 2.0", "hippos_running_requests 3.0", "hippos_tokens_per_second 12.5",
                 "hippos_cached_prompt_tokens_total 40.0", "hippos_state_cache_hits_total 4.0",
                 "hippos_state_cache_bytes 4096.0", 'hippos_requests_finished_total{reason="length"} 2.0',
                 'hippos_http_responses_total{status="429"} 1.0'):  # fmt: skip
        assert line in text.splitlines(), line
    assert Metrics(FixedStats()).render()[0] != metrics.render()[0]  # a registry per app, not a shared one
