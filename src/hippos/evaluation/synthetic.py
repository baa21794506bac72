"""Accuracy and loss of a language model on synthetic-task examples (hippos.data.synthetic formats)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.synthetic import Examples
from ..models import H3LM
from ..ops.checks import values_known


def _check_examples_fit(inputs: torch.Tensor, vocab_size: int) -> None:
    """Refuse inputs (n, T) holding ids outside the vocabulary (nothing to read where values are unknown)."""
    if not values_known(inputs):
        return
    high = int(inputs.max())
    if high >= vocab_size or int(inputs.min()) < 0:
        raise ValueError(f"examples hold token id {high}, outside the model's vocabulary 0 .. {vocab_size - 1}")


@torch.no_grad()
def evaluate_examples(model: H3LM, examples: Examples, vocab_size: int | None = None, batch_size: int = 256) -> dict:
    """{"accuracy", "loss", "examples"} of `model` on the graded positions of `examples`.

    examples: inputs, targets, graded each (n, T). accuracy: fraction of graded positions whose argmax over
    the first `vocab_size` logits (default: the model's real vocabulary) is the target; loss: mean
    cross-entropy there (nats). Runs in eval mode and restores the model's mode afterwards.
    """
    vocab_size = vocab_size or model.config.vocab_size
    n = examples.num_examples
    if n == 0:
        raise ValueError("no examples to evaluate")
    _check_examples_fit(examples.inputs, model.config.vocab_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = count = 0
    loss_sum = 0.0
    try:
        for i in range(0, n, batch_size):
            x, y, g = examples.select(slice(i, i + batch_size)).to(device)
            picked, answers = model.logits_at(x, g)[:, :vocab_size].float(), y[g]
            correct += int((picked.argmax(-1) == answers).sum())
            count += answers.numel()
            loss_sum += float(F.cross_entropy(picked, answers, reduction="sum"))
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the examples have no graded positions")
    return {"accuracy": correct / count, "loss": loss_sum / count, "examples": n}
