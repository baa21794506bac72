"""Showing generated text as it comes."""

from __future__ import annotations

import sys

from torch import Tensor


class TextStreamer:
    """Writes the text of row 0 as its tokens come: a `streamer` for `generate` (put(tokens (B,)), end()).

    It decodes everything so far and writes the new part: decoding the whole text (not token by token) keeps
    multi-byte characters intact, and a trailing partial character (U+FFFD) is held back until its remaining
    bytes arrive.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout  # looked up now: stdout may be redirected
        self.ids: list[int] = []
        self.shown = 0

    def put(self, tokens: Tensor) -> None:
        """Take the next token of every row (B,); write row 0's new text."""
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown :])
        self.out.flush()
        self.shown = len(text)

    def end(self) -> None:
        """Write what is left, and a newline."""
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.shown :] + "\n")
        self.out.flush()
