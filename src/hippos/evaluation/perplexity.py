"""Perplexity and bits per byte of a language model on a token stream, with a sliding window.

Windows of `context` tokens start every `stride` tokens. The first window scores all its predictions; each
later one scores only the tokens the previous windows had not, so every token after the first is predicted
exactly once, with between context - stride and context - 1 tokens of history (stride = context: disjoint
windows, the cheapest; stride 1: the most history, the slowest). Only the real vocabulary competes in the
softmax: padding ids can never be the next token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..models import H3LM
from ..ops.checks import values_known


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) per window: inputs tokens[begin:end] predict tokens[begin+1:end+1], and the
    predictions of targets at positions >= first scored count."""
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 1 and 1 <= stride <= context, got context {context}, stride {stride}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got {num_tokens}")
    windows, scored, begin = [], 1, 0  # `scored`: the next target position nobody has predicted yet
    while scored < num_tokens:
        end = min(begin + context, num_tokens - 1)
        windows.append((begin, end, scored))
        scored = end + 1
        begin += stride
    return windows


def window_batches(windows: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Windows in batches of at most batch_size, each batch of one length (all but the last are `context` long)."""
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for window in windows:
        groups.setdefault(window[1] - window[0], []).append(window)
    return [ws[i : i + batch_size] for ws in groups.values() for i in range(0, len(ws), batch_size)]


def _check_tokens(tokens, vocab_size: int) -> torch.Tensor:
    """tokens (1-D array or tensor of ids) as a 1-D int64 tensor, refused when an id is outside the vocabulary."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64) if not torch.is_tensor(tokens) else tokens).long()
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    readable = len(tokens) and values_known(tokens)  # fake tensors have no values to check
    if readable and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        raise ValueError(f"token ids outside the model's vocabulary 0 .. {vocab_size - 1}")
    return tokens


def _batch_nats(model: H3LM, tokens: torch.Tensor, batch: list[tuple[int, int, int]]) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of predictions) of the scored targets of one batch of windows."""
    device, vocab = next(model.parameters()).device, model.config.vocab_size
    x = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device)
    y = torch.stack([tokens[b + 1 : e + 1] for b, e, _ in batch]).to(device)
    positions = torch.arange(x.shape[1], device=device)
    keep = torch.stack([positions + b + 1 >= first for b, _, first in batch])
    logits = model.logits_at(x, keep)[:, :vocab]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> fp32, fp64 stays
    return float(F.cross_entropy(logits, y[keep], reduction="sum")), int(keep.sum())


@torch.no_grad()
def perplexity(
    model: H3LM,
    tokens,
    context: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    num_bytes: int | None = None,
    progress: bool = False,
) -> dict:
    """{"loss" (nats per token), "perplexity", "tokens" scored, "bits_per_byte" (when num_bytes is given)}.

    tokens: a 1-D array or tensor of ids. num_bytes: UTF-8 bytes of the text those tokens encode, for bits per
    byte (total bits / bytes: comparable across tokenizers). Runs in eval mode, restores the model's mode.
    """
    tokens = _check_tokens(tokens, model.config.vocab_size)
    windows = sliding_windows(len(tokens), context, stride or context)
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), desc="perplexity", unit="window", dynamic_ncols=True)
    try:
        for batch in window_batches(windows, batch_size):
            batch_nats, batch_count = _batch_nats(model, tokens, batch)
            nats, count = nats + batch_nats, count + batch_count
            if bar is not None:
                bar.update(len(batch))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    loss = nats / count
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    if num_bytes:
        result["bits_per_byte"] = nats / math.log(2) / num_bytes
    return result
