"""Sliding-window perplexity: every token predicted once, the right history, bits per byte."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hippos import H3LM, H3Config
from hippos.evaluation.perplexity import perplexity, sliding_windows
from tolerances import assert_close


@pytest.mark.parametrize(("n", "context", "stride"), [(2, 1, 1), (10, 4, 4), (10, 4, 1), (17, 5, 3), (9, 20, 7)])
def test_every_token_after_the_first_is_predicted_exactly_once(n, context, stride):
    predicted = []
    for begin, end, first in sliding_windows(n, context, stride):
        assert end - begin <= context and first > begin
        predicted += range(max(first, begin + 1), end + 1)
    assert predicted == list(range(1, n))


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride <= context"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_windows(1, 4, 4)


def tiny_model(**kw):
    torch.manual_seed(0)
    return H3LM(H3Config.preset("tiny", attn_layer_idx=(1,), **kw)).double().eval()


@torch.no_grad()
def direct_nats(model, tokens, context, stride):
    """Each target's loss from its own forward pass over the history a window of that stride gives it."""
    total = 0.0
    for begin, end, first in sliding_windows(len(tokens), context, stride):
        logits = model(tokens[None, begin:end]).logits[0, :, : model.config.vocab_size]
        for pos in range(max(first, begin + 1), end + 1):
            total += float(F.cross_entropy(logits[pos - begin - 1], tokens[pos]))
    return total


@pytest.mark.parametrize(("context", "stride"), [(8, 8), (8, 3), (64, 64)])
def test_perplexity_matches_per_token_losses(context, stride):
    model = tiny_model()
    tokens = torch.randint(0, 257, (30,))
    result = perplexity(model, tokens, context, stride, batch_size=2, num_bytes=40)
    nats = direct_nats(model, tokens, context, stride)
    assert result["tokens"] == 29
    got = torch.tensor([result["loss"], result["perplexity"], result["bits_per_byte"]], dtype=torch.float64)
    want = torch.tensor([nats / 29, math.exp(nats / 29), nats / math.log(2) / 40], dtype=torch.float64)
    assert_close(got, want)  # batched windows against one window at a time: summation order only


@torch.no_grad()
def test_one_window_over_everything_is_the_forward_loss_over_the_real_vocabulary():
    model = tiny_model()
    tokens = torch.randint(0, 257, (20,))
    logits = model(tokens[None, :-1]).logits[0, :, :257]
    expected = F.cross_entropy(logits, tokens[1:])
    loss = perplexity(model, tokens.numpy(), context=100)["loss"]
    assert_close(torch.tensor(loss, dtype=torch.float64), expected)


def test_bad_tokens_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(model, torch.tensor([1, 2, 300]))
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 3, dtype=torch.long))
