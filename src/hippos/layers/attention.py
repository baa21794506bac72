"""Causal multi-head attention with a KV cache as its state, and optional GPT-NeoX style rotary embedding.

The state (AttentionState) holds a length per row, so that rows at different positions share a batch: left-padded
prompts, and rows that join or leave a running batch (`concat`, `select`), each attend to their own tokens only.

Parameter layout follows the official hybrid models (docs/models.md): a fused Wqkv whose rows are all query
heads, then all key heads, then all value heads, with bias; out_proj with bias; scale 1/sqrt(head size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.checks import values_known
from ._checks import check_sequence, check_token
from .decode_linear import decode_linear
from .state import MixerState, check_concat, row_index


class KVBuffers:
    """Preallocated keys and values (B, n_head, capacity, head_dim) that successive states extend in place.

    `filled` counts the slots that any state on these buffers has written. Every such state ends at or before
    `filled` and reads only the slots before its own end, so the state that ends exactly at `filled` may write
    the slots after it in place: they are nobody's. Any other state copies first: it is being extended a second
    time (a branch, or a state that was kept and is continued again), and the slots after it are taken.
    """

    def __init__(self, k: Tensor, v: Tensor, filled: int):
        self.k, self.v, self.filled = k, v, filled

    @property
    def capacity(self) -> int:
        """Slots allocated."""
        return self.k.shape[2]


@dataclass(eq=False)
class AttentionState(MixerState):
    """The keys and values of every row so far: a KV cache whose rows may be at different positions.

    Storage is right-aligned: every row ends at slot `end`, and row b holds slots start[b] .. end - 1, so its
    length is end - start[b], which is also the position of its next token (rotary). Left padding of a prompt
    and rows that joined the batch later both show as a larger start; a row never attends to slots before its
    start. A decode step writes slot `end` of every row at once: one in-place copy into preallocated buffers
    (doubling when full), no host sync, no loop over rows. `concat` right-aligns rows of different lengths.
    """

    buffers: KVBuffers
    end: int  # slots in use, the same for every row
    start: Tensor | None = None  # (B,) long: each row's first slot; None: slot 0 for every row

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.buffers.k.shape[0]

    def keys(self) -> Tensor:
        """Keys (B, n_head, end, head_dim); row b's are those from slot start[b] on."""
        return self.buffers.k[:, :, : self.end]

    def values(self) -> Tensor:
        """Values (B, n_head, end, head_dim), laid out as the keys."""
        return self.buffers.v[:, :, : self.end]

    def lengths(self) -> Tensor:
        """Tokens each row holds, (B,) long."""
        if self.start is None:
            return torch.full((self.batch_size,), self.end, device=self.buffers.k.device)
        return self.end - self.start

    def append(self, k: Tensor, v: Tensor) -> AttentionState:
        """A state with keys and values (B, n_head, L, head_dim) after each row's own; this one is unchanged."""
        end = self.end + k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or self.buffers.k.requires_grad):
            # Autograd keeps the old keys for the backward pass: new tensors, nothing written in place.
            buffers = KVBuffers(torch.cat([self.keys(), k], 2), torch.cat([self.values(), v], 2), end)
            return AttentionState(buffers, end, self.start)
        buffers = self.buffers
        if buffers.filled != self.end or end > buffers.capacity:
            buffers = self._copy(max(end, 2 * buffers.capacity) if end > buffers.capacity else buffers.capacity)
        buffers.k[:, :, self.end : end] = k
        buffers.v[:, :, self.end : end] = v
        buffers.filled = end
        return AttentionState(buffers, end, self.start)

    def _copy(self, capacity: int) -> KVBuffers:
        """New buffers of this capacity holding this state's slots."""
        grow = (0, 0, 0, capacity - self.end)
        return KVBuffers(F.pad(self.keys(), grow), F.pad(self.values(), grow), self.end)

    def select(self, rows: Tensor | Sequence[int]) -> AttentionState:
        """A state of the given rows (any order, repeats allowed), in new buffers of the same capacity."""
        index = row_index(rows, self.buffers.k.device)
        k, v = (t.index_select(0, index) for t in (self.buffers.k, self.buffers.v))
        start = None if self.start is None else self.start.index_select(0, index.to(self.start.device))
        return AttentionState(KVBuffers(k, v, self.end), self.end, start)

    @classmethod
    def concat(cls, states: Sequence[AttentionState]) -> AttentionState:
        """The rows of every state, right-aligned at the longest; slots no row uses are dropped (reads starts)."""
        check_concat(cls, states)
        used = [s.end - s._first_used() for s in states]
        end = max(used)
        first = states[0].buffers.k
        capacity = end + max(s.buffers.capacity - s.end for s in states)  # the largest headroom stays
        k = first.new_zeros((sum(s.batch_size for s in states), first.shape[1], capacity, first.shape[3]))
        v = torch.zeros_like(k)
        row = 0
        for s, n in zip(states, used, strict=True):
            rows, slots = slice(row, row + s.batch_size), slice(end - n, end)
            k[rows, :, slots], v[rows, :, slots] = s.keys()[:, :, s.end - n :], s.values()[:, :, s.end - n :]
            row += s.batch_size
        if all(s.start is None and s.end == end for s in states):
            return cls(KVBuffers(k, v, end), end)
        start = torch.cat([end - s.lengths().to(first.device) for s in states])  # slot j moves to j + end - s.end
        return cls(KVBuffers(k, v, end), end, start)

    def _first_used(self) -> int:
        """The first slot any row uses (a host read of start; 0 where its values are unknown)."""
        if self.start is None or self.batch_size == 0 or not values_known(self.start):
            return 0
        return int(self.start.min())

    def to(self, device=None, dtype: torch.dtype | None = None) -> AttentionState:
        """This state on `device`, keys and values in `dtype` (None: unchanged)."""
        k, v = (t.to(device, dtype) for t in (self.buffers.k, self.buffers.v))
        start = None if self.start is None else self.start.to(device)
        if k is self.buffers.k and v is self.buffers.v:
            return AttentionState(self.buffers, self.end, start)  # the same buffers: share their fill count too
        return AttentionState(KVBuffers(k, v, self.end), self.end, start)

    def to_tensors(self) -> dict[str, Tensor]:
        """{"k", "v": (B, n_head, end, head_dim), and "start": (B,) when some row does not start at slot 0}."""
        tensors = {"k": self.keys(), "v": self.values()}
        if self.start is not None:
            tensors["start"] = self.start
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> AttentionState:
        """The state `to_tensors` described (its first step copies: the given tensors are never written)."""
        if not {"k", "v"} <= set(tensors) <= {"k", "v", "start"}:
            raise ValueError(f"AttentionState needs tensors k, v and optionally start, got {sorted(tensors)}")
        end = tensors["k"].shape[2]
        return cls(KVBuffers(tensors["k"], tensors["v"], end), end, tensors.get("start"))


class Rotary(nn.Module):
    """Rotary position embedding of the first `dim` features of each head, halves paired (GPT-NeoX)."""

    def __init__(self, dim: int, base: float = 10000.0, device=None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim, self.base = dim, base

    def inv_freq(self, device, dtype=torch.float32) -> Tensor:
        """1 / base^(2i / dim) in float32 (float64 for float64 models), never lower: a buffer would be rounded
        by model.to(bfloat16), which at position 2000 moves the rotated features by as much as they are large."""
        return 1.0 / self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=dtype) / self.dim)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate x (B, n_head, L, head_dim) for positions (L,) or per sequence (B, L)."""
        exact = torch.float64 if x.dtype == torch.float64 else torch.float32
        angles = positions.to(exact)[..., None] * self.inv_freq(x.device, exact)  # (..., L, dim / 2)
        if angles.dim() == 3:
            angles = angles[:, None]  # per sequence: broadcast over heads
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        half = self.dim // 2
        x1, x2, rest = x[..., :half], x[..., half : self.dim], x[..., self.dim :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def left_padding(mask: Tensor) -> Tensor:
    """Number of leading padding tokens per sequence (B,) from a (B, L) mask; refuses other padding."""
    mask = mask.bool()
    pad = (~mask).sum(1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None] >= pad[:, None]
    if values_known(mask) and not torch.equal(mask, expected):
        raise ValueError("attention_mask must be left padding (zeros, then ones) for every sequence")
    return pad


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention; x (B, L, d_model). State: an AttentionState of the tokens seen so far."""

    def __init__(self, d_model: int, n_head: int, rotary_dim: int = 0, device=None, dtype=None):
        super().__init__()
        if n_head < 1 or d_model % n_head:
            raise ValueError(f"n_head {n_head} must divide d_model {d_model}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.n_head, self.head_dim = d_model, n_head, d_model // n_head
        if rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} exceeds the head size {self.head_dim}")
        self.Wqkv = nn.Linear(d_model, 3 * d_model, **factory)
        self.out_proj = nn.Linear(d_model, d_model, **factory)
        self.rotary_emb = Rotary(rotary_dim, device=device) if rotary_dim else None

    def init_state(self, batch_size: int, device=None, dtype=None, capacity: int = 256) -> AttentionState:
        """Empty state with room for `capacity` tokens per row (it grows when needed)."""
        dtype = dtype or self.Wqkv.bias.dtype  # not .weight: an int8 layer would dequantize it to answer
        shape = (batch_size, self.n_head, capacity, self.head_dim)
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        return AttentionState(KVBuffers(zeros, torch.zeros_like(zeros), 0), 0)

    def _heads(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v each (B, n_head, L, head_dim), rotary applied at `positions`."""
        B, L, _ = x.shape
        qkv = decode_linear(self.Wqkv, x[:, 0]) if L == 1 else self.Wqkv(x)
        q, k, v = qkv.view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(q, positions), self.rotary_emb(k, positions)
        return q, k, v

    def forward(
        self, x: Tensor, state: AttentionState | None = None, return_state: bool = False, mask: Tensor | None = None
    ) -> tuple[Tensor, AttentionState | None]:
        """Whole sequence after each row's cached tokens; x (B, L, D) -> (out (B, L, D), state or None).

        mask (B, L), 1 for real tokens and 0 for left padding, only where the sequence starts (no cache yet).
        """
        check_sequence(x, self.d_model)
        B, L, D = x.shape
        if state is not None:
            _check_rows(state, B)
        past = state.end if state is not None else 0
        start = state.start if state is not None else None
        if mask is not None:
            if past:
                raise ValueError("attention_mask applies to the start of a sequence; a cache already holds tokens")
            start = left_padding(mask)
        q, k, v = self._heads(x, _positions(past, L, start, x.device))
        if past or return_state:
            empty = state if state is not None else self.init_state(B, x.device, k.dtype, capacity=L)
            state = dataclasses.replace(empty, start=start).append(k, v)
            keys, values = state.keys(), state.values()
        else:
            keys, values = k, v
        if start is None and not past:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=_prefill_mask(past, L, start, x.device))
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, D))
        return out, (state if return_state else None)

    def step(self, x_t: Tensor, state: AttentionState, *, in_place: bool = False) -> tuple[Tensor, AttentionState]:
        """One token per row; x_t (B, D) -> (out (B, D), state with the token appended to every row).

        in_place is accepted for the mixers' common signature: a state that ends where its buffers end is always
        extended in place already (docs/state.md), and any other copies first, whoever owns it.
        """
        check_token(x_t, self.d_model)
        _check_rows(state, x_t.shape[0])
        q, k, v = self._heads(x_t[:, None], _positions(state.end, 1, state.start, x_t.device))
        state = state.append(k, v)
        mask = None
        if state.start is not None:  # each row sees its own slots only
            mask = (torch.arange(state.end, device=x_t.device) >= state.start[:, None])[:, None, None]
        out = F.scaled_dot_product_attention(q, state.keys(), state.values(), attn_mask=mask)
        return decode_linear(self.out_proj, out.reshape(x_t.shape[0], self.d_model)), state


def _check_rows(state: AttentionState, batch: int) -> None:
    """Require a state of `batch` rows."""
    if state.batch_size != batch:
        raise ValueError(
            f"attention state has {state.batch_size} rows, expected {batch}; "
            "build it with init_state(batch_size) or take it from the same layer"
        )


def _positions(past: int, length: int, start: Tensor | None, device) -> Tensor:
    """Positions of the next `length` tokens after slot `past`: (length,), or per row (B, length) given starts.

    Made on the device: torch.tensor([past], device=...) would copy from the host, and that copy waits for the
    device's queue to drain, every decode step.
    """
    slots = torch.arange(past, past + length, device=device)
    return slots if start is None else slots[None] - start[:, None]


def _prefill_mask(past: int, length: int, start: Tensor | None, device) -> Tensor:
    """Which slots each new query sees: (length, past + length), or per row (B, 1, length, past + length).

    Query i sits in slot past + i and sees slots 0 .. past + i, except those before its row's start (padding,
    or slots from before the row joined); a padded query still sees itself, so that no row of the mask is empty.
    """
    slots = torch.arange(past, past + length, device=device)
    key_slots = torch.arange(past + length, device=device)
    allowed = key_slots[None, :] <= slots[:, None]
    if start is None:
        return allowed
    allowed = (allowed & (key_slots >= start[:, None, None])) | (key_slots == slots[:, None])
    return allowed[:, None]
