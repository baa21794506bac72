"""Tokenizers: a built-in byte-level one, and any Hugging Face tokenizer by name or path.

Both offer the same small interface: encode(text) -> list[int], decode(ids) -> str, vocab_size,
eos_token_id (or None), name.
"""

from __future__ import annotations

import os
from typing import Protocol


class Tokenizer(Protocol):
    """What the rest of hippos needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-text token 256. Needs no files and no download."""

    name = "bytes"
    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        """Text -> byte ids."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; the end-of-text token is dropped and broken UTF-8 shows as U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory) -> None:
        """Write this tokenizer as a Hugging Face one (same ids), so AutoTokenizer and lm-eval can load it.

        A byte-level BPE without merges: its vocabulary maps each byte, in GPT-2's printable byte alphabet, to
        the byte's value, and "<|endoftext|>" to 256.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        chars = _printable_bytes()
        tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOT])
        _save_hf(tok, directory)


class HFTokenizer:
    """Adapter for a Hugging Face tokenizer (transformers' AutoTokenizer)."""

    def __init__(self, tokenizer, name: str):
        self._tok = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Text -> token ids, without special tokens added."""
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, directory) -> None:
        """Write the tokenizer's files into directory (AutoTokenizer loads them from there)."""
        self._tok.save_pretrained(str(directory))


EOT = "<|endoftext|>"


def _printable_bytes() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the others for chr(256 + n) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _save_hf(tok, directory) -> None:
    """A `tokenizers` Tokenizer as a folder that transformers' AutoTokenizer loads (end-of-text: EOT)."""
    import json
    from pathlib import Path

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
              "model_max_length": 1 << 30}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def load_tokenizer(name: str = "bytes") -> ByteTokenizer | HFTokenizer:
    """ "bytes" for the built-in tokenizer; otherwise a Hugging Face tokenizer name ("gpt2") or local path."""
    if name == "bytes":
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(
            f"tokenizer {name!r} needs transformers: pip install 'hungry-hippos[hf]' (or use --tokenizer bytes)"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # offline, unknown name, broken files
        where = "the local path" if os.path.exists(name) else "the Hugging Face Hub"
        raise OSError(
            f"could not load tokenizer {name!r} from {where} ({type(err).__name__}: {err}). If you are offline, "
            "download it elsewhere and pass its directory, or use --tokenizer bytes."
        ) from err
    return HFTokenizer(tok, name)


def train_bpe_tokenizer(
    specs: str | list[str],
    vocab_size: int,
    out_dir,
    text_field: str = "text",
    min_frequency: int = 2,
    progress: bool = True,
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (the `tokenizers` library) on text sources; save it to out_dir.

    The folder (tokenizer.json + tokenizer_config.json) loads with `load_tokenizer(out_dir)` and with
    transformers' AutoTokenizer. Its end-of-text token is "<|endoftext|>", the last id of the vocabulary.
    """
    from .text import find_sources, iter_documents

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size {vocab_size} must exceed the 256 byte tokens and end-of-text: at least 258")
    tok, trainer = _bpe_trainer(vocab_size, min_frequency, progress)
    sources = find_sources(specs)
    seen = {"chars": 0}

    def texts():
        for source in sources:
            for blocks in iter_documents(source, text_field):
                seen["chars"] += sum(len(b) for b in blocks)
                yield from blocks

    tok.train_from_iterator(texts(), trainer=trainer)
    if seen["chars"] == 0:
        raise ValueError(f"no text in {', '.join(s.describe() for s in sources)}: nothing to train a tokenizer on")
    tok.add_special_tokens([EOT])
    _save_hf(tok, out_dir)
    return load_tokenizer(str(out_dir))


def _bpe_trainer(vocab_size: int, min_frequency: int, progress: bool):
    """(an empty byte-level BPE Tokenizer, its BpeTrainer) from the `tokenizers` library."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError(
            "training a tokenizer needs the tokenizers package: pip install 'hungry-hippos[hf]'"
        ) from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the end-of-text token comes last, after the merges
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    return tok, trainer
