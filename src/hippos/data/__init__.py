"""Data: tokenizers (and, later, datasets and synthetic tasks). Depends on nothing else in hippos."""

from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]
