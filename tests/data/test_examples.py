"""Example text files: downloaded once from a local HTTP server, checked by SHA-256, cached, refused when bad.

Every test points a registry entry at a small file served on 127.0.0.1: the real internet is never contacted.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import pytest

import hippos.data.examples as examples
from hippos.cli import main
from hippos.data.examples import EXAMPLES, Example, example_path, fetch_example
from hippos.data.text import check_source_spec, find_sources

TEXT = b"To be, or not to be, that is the question:\n" * 50


class Server:
    """An HTTP server on 127.0.0.1 in a thread, serving `files` (URL path -> bytes) and counting requests."""

    def __init__(self, files: dict[str, bytes]):
        served, self.requests = files, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the name http.server calls)
                outer.requests.append(self.path)
                if self.path not in served:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(served[self.path])))
                self.end_headers()
                self.wfile.write(served[self.path])

            def log_message(self, *args):  # keep the test output clean
                pass

        outer = self
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Shut the server down and free its port (safe to call twice)."""
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = Server({"/tiny.txt": TEXT, "/other.txt": b"not the same text"})
    yield srv
    srv.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache of this test's own (the session's may hold the real example files)."""
    monkeypatch.setenv("HIPPOS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def register(monkeypatch, url: str, data: bytes = TEXT, name: str = "tiny") -> Example:
    """Put an entry for `data` at `url` in the registry, for this test only."""
    entry = Example(url, len(data), hashlib.sha256(data).hexdigest(), f"{name}.txt", "a test file")
    monkeypatch.setitem(EXAMPLES, name, entry)
    return entry


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/tiny.txt"


def test_first_use_downloads_and_caches_then_the_cache_is_used_without_the_server(server, cache, monkeypatch):
    register(monkeypatch, f"{server.url}/tiny.txt")
    path = fetch_example("tiny", progress=False)
    assert path == cache / "examples" / "tiny.txt" == example_path("tiny")
    assert path.read_bytes() == TEXT and server.requests == ["/tiny.txt"]
    assert [p.name for p in path.parent.iterdir()] == ["tiny.txt"]  # no temporary file left behind
    server.stop()
    assert fetch_example("tiny", progress=False) == path  # offline now: the cached file, checked, no request
    (source,) = find_sources(["example:tiny"], progress=False)
    assert (source.kind, source.location) == ("text", str(path)) and server.requests == ["/tiny.txt"]


@pytest.mark.parametrize("served", ["/other.txt", "/tiny.txt"])
def test_a_download_that_does_not_match_leaves_nothing_and_names_both_hashes(server, cache, monkeypatch, served):
    expected = register(monkeypatch, f"{server.url}{served}", data=TEXT + b"!")  # wrong size and hash
    actual = hashlib.sha256(TEXT if served == "/tiny.txt" else b"not the same text").hexdigest()
    with pytest.raises(ValueError, match=rf"expected .*{expected.sha256}.*got .*{actual}"):
        fetch_example("tiny", progress=False)
    assert list((cache / "examples").iterdir()) == []


def test_a_download_larger_than_expected_is_cut_short_and_refused(server, cache, monkeypatch):
    register(monkeypatch, f"{server.url}/tiny.txt", data=TEXT[:100])
    monkeypatch.setattr(examples, "CHUNK", 64)
    with pytest.raises(ValueError, match="expected 100 bytes.*got 128 bytes"):
        fetch_example("tiny", progress=False)
    assert list((cache / "examples").iterdir()) == []


def test_a_damaged_cached_file_is_refused_with_the_fix(server, cache, monkeypatch):
    register(monkeypatch, f"{server.url}/tiny.txt")
    path = fetch_example("tiny", progress=False)
    server.stop()
    path.write_bytes(TEXT.replace(b"question", b"answer!!"))  # same size, other content
    with pytest.raises(ValueError, match=rf"cached file {path} is damaged .*delete it"):
        fetch_example("tiny", progress=False)
    assert path.is_file()  # the user's file is theirs to delete


@pytest.mark.parametrize("where", ["nothing listening", "not found", "silent"])
def test_a_failed_download_is_one_line_naming_the_url_and_the_path(server, cache, monkeypatch, where):
    silent = socket.socket()  # accepts connections (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    url = {
        "nothing listening": closed_port_url(),
        "not found": f"{server.url}/missing.txt",
        "silent": f"http://127.0.0.1:{silent.getsockname()[1]}/tiny.txt",
    }[where]
    register(monkeypatch, url)
    monkeypatch.setattr(examples, "TIMEOUT", 0.5)
    try:
        with pytest.raises(OSError) as info:
            fetch_example("tiny", progress=False)
    finally:
        silent.close()
    message = str(info.value)
    assert "\n" not in message and message.startswith("could not download example:tiny (")
    assert f"download {url} and save it as {cache / 'examples' / 'tiny.txt'}" in message
    assert "--data.train FILE" in message and "--data FILE" in message
    assert ("HTTP 404" in message) == (where == "not found")
    assert list((cache / "examples").iterdir()) == []


def test_the_command_line_prints_the_offline_message_without_a_traceback(cache, monkeypatch, tmp_path, capsys):
    register(monkeypatch, closed_port_url(), name="tinyshakespeare")
    config = tmp_path / "lm.toml"
    config.write_text('[model]\nd_model = 16\nn_layer = 1\nd_state = 4\n\n[data]\ntrain = ["example:tinyshakespeare"]\n'
                      'seq_len = 8\n\n[train]\nsteps = 1\nbatch_size = 2\n')  # fmt: skip
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hippos: error: could not download example:tinyshakespeare") and "\n" not in err
    assert "Traceback" not in err


def test_unknown_names_and_malformed_specs_are_refused_without_any_download(cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("checking a spec must not download")

    monkeypatch.setattr(examples, "_download", no_network)
    for call in (
        fetch_example,
        lambda name: find_sources(f"example:{name}"),
        lambda n: check_source_spec(f"example:{n}"),
    ):
        with pytest.raises(ValueError, match="unknown example 'nope': known examples are .*tinyshakespeare"):
            call("nope")
    for spec in ("example:tinyshakespeare", "example:wikitext2-valid", "no/such/file.txt", "hf:wikitext:valid"):
        check_source_spec(spec)  # syntax only: nothing is read or fetched
    for spec in ("hf:", "hf:a:b:c:d", "  "):
        with pytest.raises(ValueError):
            check_source_spec(spec)


def test_every_registry_entry_is_pinned_and_complete():
    for name, entry in EXAMPLES.items():
        commit = entry.url.split("/")[5]
        assert entry.url.startswith("https://raw.githubusercontent.com/") and len(commit) == 40, name
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0 and entry.size > 0, name
        assert entry.filename == f"{name}.txt", name  # tests/conftest.py copies the team's files by these names
