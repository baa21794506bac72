"""`hippos serve` as users run it: a separate process on 127.0.0.1 and a free port, driven by OpenAI's client and
raw HTTP: the key, bad requests, the body limit, a full queue (429), a client that goes away, and Ctrl-C, which
lets the running request finish before the process exits 0. One server process for the whole module.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hippos.serving.server import ServeConfig  # noqa: E402

KEY = "test-key-123"
START_S = 120  # importing torch and loading the model on a loaded machine
LONG = {"model": "tiny", "max_tokens": 4000, "temperature": 0}  # greedy: no EOS, seconds of decoding


class ServerProcess:
    """`python -m hippos serve ...` with its stdout's first line (the address) read within a time limit."""

    def __init__(self, args: list[str], log_path):
        env = {k: v for k, v in os.environ.items() if k != "HIPPOS_API_KEY"}
        env["OMP_NUM_THREADS"] = "1"  # a tiny model decodes fastest on one thread, and CI machines are shared
        self.log = open(log_path, "w")  # noqa: SIM115 -- uvicorn's log: a file, so a full pipe never blocks it
        self.proc = subprocess.Popen([sys.executable, "-m", "hippos", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            self.banner = lines.get(timeout=START_S)
        except queue.Empty:
            self.stop()
            pytest.fail(f"hippos serve did not start within {START_S} s; its log: {self.log_text()}")
        if not self.banner:
            pytest.fail(f"hippos serve exited with {self.proc.wait(5)}; its log: {self.log_text()}")
        self.port = int(self.banner.rsplit(":", 1)[1].split("/")[0])

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def stop(self) -> int:
        """Ctrl-C, a bounded wait, then kill; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(served_model_dir, tmp_path_factory):
    limits = {"max_running": 1, "max_queue": 1, "max_tokens": 4000, "max_body_bytes": 2048}
    args = ["--model", str(served_model_dir), "--port", "0", "--api-key", KEY]
    args += [text for name, value in limits.items() for text in (f"--serve.{name}", str(value))]
    running = ServerProcess(args, tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield running
    running.stop()


@pytest.fixture
def http(server, web):
    return web.Http(server.port, api_key=KEY)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_prints_its_address_and_serves_the_folder_name(server, client):
    assert server.banner.startswith("serving tiny at http://127.0.0.1:")
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_openai_client_whole_and_streamed(client):
    whole = client.completions.create(model="tiny", prompt="Hippos ", max_tokens=6, temperature=0)
    stream = client.completions.create(model="tiny", prompt="Hippos ", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    assert whole.usage.prompt_tokens == 7 and whole.choices[0].finish_reason in ("length", "stop")


def test_key_is_required(http):
    assert http.request("GET", "/health", auth=False)[0] == 200
    status, _, reply = http.complete({"model": "tiny", "prompt": "x"}, auth=False)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert http.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}x"}, auth=False)[0] == 401


def test_bad_json_and_big_body_leave_it_serving(http):
    status, _, reply = http.complete(b'{"model": "tiny", "prompt": ')
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    status, _, reply = http.complete({"model": "tiny", "prompt": "x", "stream": "yes"})
    assert status == 400 and reply["error"]["param"] == "stream"
    status, _, reply = http.complete({"model": "tiny", "prompt": "x" * 3000})
    assert status == 413 and "at most 2048" in reply["error"]["message"]
    assert http.request("GET", "/health")[0] == 200


def test_full_queue_gets_429_and_clients_that_leave_free_their_rows(http, web):
    running = lambda: http.metrics()["hippos_running_requests"]  # noqa: E731
    first, first_resp = http.open_stream({**LONG, "prompt": "a"})
    assert first_resp.status == 200 and web.read_events(first_resp, limit=1)
    web.wait_until(lambda: running() == 1, "the first request to hold the one row")
    second, second_resp = http.open_stream({**LONG, "prompt": "b"})  # waits in the queue of one
    web.wait_until(lambda: http.metrics()["hippos_queue_requests"] == 1, "the second request to queue")
    status, headers, reply = http.complete({**LONG, "prompt": "c"})
    assert status == 429 and int(headers["retry-after"]) >= 1 and reply["error"]["code"] == "queue_full"
    cancelled = http.metrics()['hippos_requests_finished_total{reason="cancelled"}']
    for conn in (first, second):
        conn.close()
    web.wait_until(lambda: running() == 0 and http.metrics()["hippos_queue_requests"] == 0, "the rows to free up")
    assert http.metrics()['hippos_requests_finished_total{reason="cancelled"}'] == cancelled + 2
    assert http.metrics()['hippos_http_responses_total{status="429"}'] == 1


def test_ctrl_c_finishes_the_running_request_then_exits_0(server, http, web):
    """Last in the module: it stops the server."""
    conn, resp = http.open_stream({"model": "tiny", "prompt": "z", "max_tokens": 40, "temperature": 0,
                                   "stream_options": {"include_usage": True}})  # fmt: skip
    assert resp.status == 200 and web.read_events(resp, limit=1)
    server.proc.send_signal(signal.SIGINT)
    events = web.read_events(resp)
    conn.close()
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(web.WAIT_S) == 0


@pytest.mark.slow  # a fresh process importing torch
def test_importing_hippos_and_the_cli_does_not_import_fastapi():
    web = ("fastapi", "uvicorn", "starlette", "prometheus_client")
    code = ("import sys, hippos, hippos.serving, hippos.serving.server, hippos.cli; hippos.cli.build_parser(); "
            f"print(sorted(m for m in {web} if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=START_S)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize(
    ("fields", "words"),
    [({"port": 70000}, "port must be from 0 to 65535"), ({"max_queue": 0}, "max_queue must be > 0"),
     ({"api_key": "two words"}, "api_key"), ({"host": ""}, "host"), ({"max_tokens": 1.5}, "max_tokens")],
)  # fmt: skip
def test_serve_config_refuses_bad_values(fields, words):
    with pytest.raises(ValueError, match=words):
        ServeConfig(**fields)
    assert ServeConfig(host="::1", port=9).url() == "http://[::1]:9/v1"
