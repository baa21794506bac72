"""The decode loop: the prompt in parallel (every layer returns its state), then one recurrent step a token.

`stream` yields the new tokens as they come; `generate` collects them. Sequences of a batch stop on their
own EOS (later positions are filled with EOS); prompts of different lengths go in one batch left-padded
with an attention mask, and the padding never reaches a state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..models import H3LM
from ..models.lm import LMState
from ..ops.checks import values_known
from .sampling import check_generator, check_sampling, sample_next


@dataclass
class Sampling:
    """How to choose each next token."""

    temperature: float = 1.0  # 0 is greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens holding this much probability
    eos_token_id: int | None = None  # a sequence that emits it is finished
    generator: torch.Generator | None = None  # random source, for reproducible sampling


def _check_request(model: H3LM, input_ids, max_new_tokens: int, sampling: Sampling, attention_mask, state) -> None:
    """Refuse sampling settings, a prompt, a mask or a generator that cannot work, before any work."""
    check_sampling(sampling.temperature, sampling.top_k, sampling.top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_prompt(input_ids, attention_mask, state)
    check_generator(sampling.generator, model.device)


def _check_prompt(input_ids: Tensor, attention_mask: Tensor | None, state: LMState | None) -> None:
    """Refuse an empty prompt, a mask that is not left padding of a fresh prompt, a state of another batch size."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) prompt, got shape {tuple(input_ids.shape)}")
    if state is not None and state.batch_size != input_ids.shape[0]:
        raise ValueError(f"the state holds {state.batch_size} sequences but input_ids {input_ids.shape[0]}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if state is not None:
            raise ValueError("attention_mask (left padding) only applies to a fresh prompt, not after a state")
        if values_known(attention_mask) and not attention_mask.bool().any(1).all():
            raise ValueError("every prompt needs at least one real token (attention_mask all zero in a row)")


@torch.inference_mode()
def stream(
    model: H3LM,
    input_ids: Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    attention_mask: Tensor | None = None,
    state: LMState | None = None,
    final_state: list | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every sequence, (B,), up to max_new_tokens times or until all hit EOS.

    state: continue from a state saved after earlier text (input_ids is then the text that follows).
    final_state: a list to which the LMState after every token, the last one included, is appended at the end.
    """
    sampling = sampling or Sampling()
    _check_request(model, input_ids, max_new_tokens, sampling, attention_mask, state)
    eos, s = sampling.eos_token_id, sampling
    options = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "generator": s.generator}
    choose = partial(sample_next, vocab_size=model.config.vocab_size, **options)
    out = model(input_ids, attention_mask=attention_mask, state=state, return_state=True)
    state, logits = out.state, out.logits[:, -1]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = choose(logits)
        if eos is not None:
            token = token.masked_fill(done, eos)
            done |= token == eos
        yield token
        # Whether every sequence has finished is read from the device (a sync on an accelerator); where values
        # are unknown (fake tensors, compiling) decoding runs to max_new_tokens, finished rows emitting EOS.
        last = i == max_new_tokens - 1 or (eos is not None and values_known(done) and bool(done.all()))
        if not last or final_state is not None:  # the state must cover the last token too
            logits, state = model.step(token, state)
        if last:
            break
    if final_state is not None:
        final_state.append(state)


def generate(
    model: H3LM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    state: LMState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, LMState]:
    """Prompt (B, L) -> (B, L + new) token ids, new <= max_new_tokens (fewer when every sequence hit EOS).

    Greedy when temperature is 0 or top_k is 1. streamer: any object with put(tokens (B,)) and end(), such as
    TextStreamer. state / return_state: continue from, and hand back (as (ids, state)), the model's LMState.
    """
    sampling = Sampling(temperature, top_k, top_p, eos_token_id, generator)
    final: list | None = [] if return_state else None
    new = []
    for token in stream(model, input_ids, max_new_tokens, sampling, attention_mask, state, final):
        new.append(token)
        if streamer is not None:
            streamer.put(token)
    if streamer is not None:
        streamer.end()
    ids = torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids.clone()
    return (ids, final[0]) if return_state else ids
