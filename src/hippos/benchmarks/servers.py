"""The servers `hippos bench serve` measures: model folders with random weights, and server processes.

Every server gets a folder holding its model and one shared word-level tokenizer: token i is the word "w<i>",
the vocabulary is the model's, and there is no end-of-text token. That tokenizer is what makes the servers
comparable from the outside: a prompt of n words is exactly n tokens for every server (text for one, token
ids for the other), every generated token decodes to text of its own, so it arrives as one server-sent event,
and with no end-of-text token no server stops before max_tokens, whatever random weights predict.

A server runs as a subprocess listening on 127.0.0.1 on a free port. `ServerProcess` is a context manager:
however the block ends (an error, Ctrl-C), the server gets SIGINT, a bounded wait, then SIGKILL; on Linux the
server is also told to die with the benchmark process (prctl PR_SET_PDEATHSIG), so none is left behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .generate import build_model

STOP_WAIT_S = 15.0  # how long a server gets to exit after SIGINT (and again after SIGKILL)
PAGE_TOKENS = 256  # transformers' default continuous-batching page: tokens per KV-cache block


def word(i: int) -> str:
    """The text of token i of the benchmark's tokenizer."""
    return f"w{i}"


def prompt_text(ids: list[int]) -> str:
    """Token ids as the text that the benchmark's tokenizer turns back into exactly those ids."""
    return " ".join(map(word, ids))


def save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """Write the benchmark's word-level tokenizer (tokenizer.json + tokenizer_config.json) into folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={word(i): i for i in range(vocab_size)}, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    # No eos_token: nothing ends a completion before max_tokens (see the module docstring).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def encode_words(folder: Path, text: str) -> list[int]:
    """Text -> ids with the tokenizer saved in folder (the one every server loads)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def state_bytes(model) -> int:
    """Bytes of one row's inference state before any token (for a pure H3 model: its whole, fixed size)."""
    return sum(t.numel() * t.element_size() for t in model.init_state(1).to_tensors().values())


def prepare_model(kind: str, preset: str, folder: Path, positions: int, seed: int) -> dict:
    """Save one benchmark model (random weights) and the tokenizer into folder; returns facts about it."""
    model = build_model(kind, preset, positions, seed=seed)
    if kind == "gpt2":  # no end-of-text: generation runs to max_tokens (the module docstring says why)
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = cfg.bos_token_id = None
    model.save_pretrained(folder)
    vocab = model.config.vocab_size
    save_word_tokenizer(folder, vocab)
    facts = {"vocab_size": vocab, "parameters": sum(p.numel() for p in model.parameters())}
    if kind == "h3":  # a fixed size only without attention (a KV cache grows with the text)
        facts["state_bytes"] = state_bytes(model)
    return facts


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, folder: Path, port: int, clients: int, cfg) -> list[str]:
    """The command line of one server: `hippos serve` for our models, `transformers serve` for GPT-2.

    cfg: the ServeBenchConfig (prompt and generation lengths, quantize); every server is sized for `clients`.
    """
    common = ["--host", "127.0.0.1", "--port", str(port)]
    longest = max(cfg.prompt_tokens, second_turn_prompt(cfg))
    if kind == "gpt2":
        # --cb-num-blocks sizes the paged KV cache; left out, transformers takes 90% of free memory for it.
        blocks = kv_blocks(clients, cfg.prompt_tokens + cfg.new_tokens, second_turn_prompt(cfg) + cfg.new_tokens)
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--continuous-batching",
                "--device", "cpu", "--dtype", "float32", "--cb-num-blocks", str(blocks), "--log-level", "warning",
                *common]  # fmt: skip
    quant = ["--quantize", cfg.quantize] if cfg.quantize != "none" else []
    limits = {"max_running": clients, "max_queue": max(clients, 64), "max_prompt_tokens": longest,
              "max_tokens": max(cfg.new_tokens, cfg.second_turn_new_tokens),
              "cache_bytes": cfg.cache_bytes}  # fmt: skip
    flags = [text for key, value in limits.items() for text in (f"--serve.{key}", str(value))]
    return [sys.executable, "-m", "hippos", "serve", "--model", str(folder), "--served-model-name", kind, *common,
            *flags, *quant]  # fmt: skip


def second_turn_prompt(cfg) -> int:
    """Tokens of the second turn's prompt: the first prompt, its reply and a follow-up (0: no second turn)."""
    return cfg.second_turn_tokens + 2 * cfg.second_turn_new_tokens if cfg.second_turn_tokens else 0


def kv_blocks(clients: int, tokens_per_request: int, second_turn: int) -> int:
    """KV-cache blocks for transformers serve: every client's request at once, the second-turn conversation,
    and a quarter more for its scheduler's safety margin."""
    need = clients * math.ceil(tokens_per_request / PAGE_TOKENS) + 2 * math.ceil(second_turn / PAGE_TOKENS)
    return math.ceil(1.25 * need) + 2


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the benchmark process dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ServerProcess:
    """A server subprocess (context manager): started on enter, stopped however the block ends."""

    def __init__(self, command: list[str], port: int, log_path: Path):
        self.command, self.port, self.log_path = command, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "HIPPOS_API_KEY"}  # the benchmark sends no key
        env["HF_HUB_OFFLINE"] = "1"  # every model is a local folder: never wait on the network
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def log_tail(self, chars: int = 1500) -> str:
        """The end of the server's output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float, http) -> None:
        """Poll GET /health until it answers 200; raise RuntimeError (with the server's output) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                if http.get(self.url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except http.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGINT (the servers' graceful stop), a bounded wait, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGINT, signal.SIGKILL):
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_WAIT_S)
                return
            except subprocess.TimeoutExpired:
                continue


def served_name(server: ServerProcess, kind: str, folder: Path, http) -> str:
    """The model name requests must carry: the folder for transformers serve, else what /v1/models lists."""
    if kind == "gpt2":
        return str(folder)
    models = http.get(server.url + "/v1/models", timeout=10.0, trust_env=False).json()["data"]
    return models[0]["id"]
