"""Shared by the HTTP server tests: a saved tiny model, and raw HTTP helpers with bounded waits.

Servers in these tests listen on 127.0.0.1 only, on a port the system picks (port 0), and every wait has a limit.
"""

from __future__ import annotations

import http.client
import json
import time
from types import SimpleNamespace

import pytest
import torch

from hippos import H3LM, H3Config

WAIT_S = 30  # the longest any test waits for a server to reach a state (a loaded CI machine is slow)


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory):
    """A tiny hybrid model (257 ids: the byte tokenizer) saved with save_pretrained, in a folder named 'tiny'."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("served") / "tiny"
    H3LM(H3Config.preset("tiny")).save_pretrained(path)
    return path


class Http:
    """Plain HTTP to a local server: requests, /metrics as numbers, and waiting for a condition."""

    def __init__(self, port: int, api_key: str | None = None):
        self.port, self.api_key = port, api_key

    def headers(self, extra: dict | None = None, auth: bool = True) -> dict:
        """Content type JSON and, when a key is set and auth is true, the Authorization header."""
        headers = {"Content-Type": "application/json"}
        if self.api_key and auth:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {**headers, **(extra or {})}

    def connect(self) -> http.client.HTTPConnection:
        """A connection to the server (10 s socket timeout)."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, auth: bool = True):
        """(status, response headers, body as JSON when it is JSON, else text)."""
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        conn = self.connect()
        try:
            conn.request(method, path, body=data, headers=self.headers(headers, auth))
            resp = conn.getresponse()
            raw = resp.read().decode()
            kind = resp.getheader("content-type", "")
            return resp.status, dict(resp.getheaders()), json.loads(raw) if "json" in kind else raw
        finally:
            conn.close()

    def complete(self, body: dict, **kwargs):
        """POST /v1/completions."""
        return self.request("POST", "/v1/completions", body, **kwargs)

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {series (with labels): value}."""
        status, _, text = self.request("GET", "/metrics")
        assert status == 200, text
        pairs = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in pairs}

    def open_stream(self, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Start a streamed completion; returns the open connection and its response (status read)."""
        conn = self.connect()
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers=self.headers())
        return conn, conn.getresponse()


def read_events(resp: http.client.HTTPResponse, limit: int | None = None) -> list:
    """Server-sent events of a stream as JSON objects ("[DONE]" as the string), up to `limit` or the end."""
    events = []
    while limit is None or len(events) < limit:
        line = resp.fp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            payload = line[len(b"data: ") :].strip().decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if payload == "[DONE]":
                break
    return events


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    """Poll condition() until it is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def web():
    """The helpers above for the test modules: web.Http, web.read_events, web.wait_until, web.WAIT_S."""
    return SimpleNamespace(Http=Http, read_events=read_events, wait_until=wait_until, WAIT_S=WAIT_S)
