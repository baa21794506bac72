"""Evaluation: accuracy on synthetic tasks, perplexity on text, and the lm-evaluation-harness bridge.

Evaluation takes what it scores from its caller (a model, examples, tokens, a tokenizer): choosing defaults,
such as a model's tokenizer, is the caller's (hippos.training.run.default_tokenizer for the command line).
"""

from .harness import run_harness
from .perplexity import perplexity
from .synthetic import evaluate_examples

__all__ = ["evaluate_examples", "perplexity", "run_harness"]
