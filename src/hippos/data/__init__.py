"""Data: tokenizers and the synthetic in-context-learning tasks. Depends on nothing else in hippos."""

from .synthetic import (
    PAPER_TASKS,
    Examples,
    SyntheticTask,
    accuracy,
    load_examples,
    make_examples,
    make_splits,
    save_examples,
)
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "PAPER_TASKS",
    "ByteTokenizer",
    "Examples",
    "HFTokenizer",
    "SyntheticTask",
    "accuracy",
    "load_examples",
    "load_tokenizer",
    "make_examples",
    "make_splits",
    "save_examples",
]
