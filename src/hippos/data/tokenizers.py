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
