"""Data: tokenizers, example texts and the synthetic in-context-learning tasks. Depends on nothing else in hippos."""

from .examples import fetch_example  # example text files (the registry: hippos.data.examples.EXAMPLES)
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
    "fetch_example",
    "load_examples",
    "load_tokenizer",
    "make_examples",
    "make_splits",
    "save_examples",
]
