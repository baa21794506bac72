"""Evaluation: accuracy on synthetic tasks (and, next, perplexity on text)."""

from .synthetic import evaluate_examples

__all__ = ["evaluate_examples"]
