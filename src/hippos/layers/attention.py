"""Causal multi-head attention with a KV cache as its state, and optional GPT-NeoX style rotary embedding.

Parameter layout follows the official hybrid models (REFERENCE 2): a fused Wqkv whose rows are all query
heads, then all key heads, then all value heads, with bias; out_proj with bias; scale 1/sqrt(head size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.checks import values_known
from ._checks import check_sequence, check_token
from .decode_linear import decode_linear


@dataclass
class KVCache:
    """Keys and values seen so far; buffers (B, n_head, capacity, head_dim) filled up to `length`.

    Decoding appends in place into preallocated buffers (doubling when full), so a token costs no copy of
    the cache. Two cases build new buffers instead, so that a cache behaves like a value: when autograd
    still needs the old contents, and when a cache is extended a second time from the same point (a state
    that was saved and is reused, or forked for several continuations): copy on write.
    """

    k: Tensor
    v: Tensor
    length: int = 0
    # How far the shared buffers have been written by any cache that uses them: a list, shared on purpose.
    written: list = field(default_factory=lambda: [0])
    # Left-padding tokens at the start of each sequence (B,) long, or None: keys there are never attended
    # to, and rotary positions count from the first real token.
    pad: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> KVCache:
        """A cache holding these new keys and values (B, n_head, L, head_dim) after the old ones."""
        need = self.length + k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or self.k.requires_grad):
            return KVCache(torch.cat([self.keys(), k], 2), torch.cat([self.values(), v], 2), need, [need], self.pad)
        buf_k, buf_v, written = self.k, self.v, self.written
        capacity = buf_k.shape[2]
        if need > capacity or written[0] > self.length:
            capacity = max(need, 2 * capacity) if need > capacity else capacity
            buf_k, buf_v = (F.pad(t[:, :, : self.length], (0, 0, 0, capacity - self.length)) for t in (self.k, self.v))
            written = [self.length]
        buf_k[:, :, self.length : need] = k
        buf_v[:, :, self.length : need] = v
        written[0] = need
        return KVCache(buf_k, buf_v, need, written, self.pad)

    def keys(self) -> Tensor:
        """Filled keys (B, n_head, length, head_dim)."""
        return self.k[:, :, : self.length]

    def values(self) -> Tensor:
        """Filled values (B, n_head, length, head_dim)."""
        return self.v[:, :, : self.length]


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
    """Causal multi-head self-attention; x (B, L, d_model). State: a KVCache of the tokens seen so far."""

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

    def init_state(self, batch_size: int, device=None, dtype=None, capacity: int = 256) -> KVCache:
        """Empty KV cache with room for `capacity` tokens (it grows when needed)."""
        dtype = dtype or self.Wqkv.weight.dtype
        shape = (batch_size, self.n_head, capacity, self.head_dim)
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        return KVCache(zeros, torch.zeros_like(zeros))

    def _heads(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v each (B, n_head, L, head_dim), rotary applied at `positions`."""
        B, L, _ = x.shape
        qkv = decode_linear(self.Wqkv, x[:, 0]) if L == 1 else self.Wqkv(x)
        q, k, v = qkv.view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(q, positions), self.rotary_emb(k, positions)
        return q, k, v

    def forward(
        self, x: Tensor, state: KVCache | None = None, return_state: bool = False, mask: Tensor | None = None
    ) -> tuple[Tensor, KVCache | None]:
        """Whole sequence after the cached tokens; x (B, L, D) -> (out (B, L, D), cache or None).

        mask (B, L), 1 for real tokens and 0 for left padding, only where the sequence starts (no cache yet).
        """
        check_sequence(x, self.d_model)
        B, L, D = x.shape
        past = state.length if state is not None else 0
        pad = state.pad if state is not None else None
        if mask is not None:
            if past:
                raise ValueError("attention_mask applies to the start of a sequence; a cache already holds tokens")
            pad = left_padding(mask)
        steps = torch.arange(past, past + L, device=x.device)
        positions = steps if pad is None else steps[None] - pad[:, None]
        q, k, v = self._heads(x, positions)
        if past or return_state:
            state = (state or self.init_state(B, x.device, k.dtype, capacity=L)).append(k, v)
            state.pad = pad
            keys, values = state.keys(), state.values()
        else:
            keys, values = k, v
        if pad is None and not past:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Query i sits at absolute position past + i and sees keys 0 .. past + i, minus padding (a padded
            # query still sees itself, so that no row is empty).
            key_pos = torch.arange(past + L, device=x.device)
            allowed = key_pos[None, :] <= steps[:, None]
            if pad is not None:
                allowed = (allowed & (key_pos >= pad[:, None, None])) | (key_pos == steps[:, None])
                allowed = allowed[:, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, D))
        return out, (state if return_state else None)

    def step(self, x_t: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        """One token; x_t (B, D) -> (out (B, D), cache with the token appended)."""
        check_token(x_t, self.d_model)
        # Filled on the device: torch.tensor([length], device=...) would copy from the host, and that copy
        # waits for the device's queue to drain, every step.
        step = torch.full((1,), state.length, device=x_t.device)
        positions = step if state.pad is None else step[None] - state.pad[:, None]
        q, k, v = self._heads(x_t[:, None], positions)
        state = state.append(k, v)
        mask = None
        if state.pad is not None:
            mask = (torch.arange(state.length, device=x_t.device) >= state.pad[:, None])[:, None, None]
        out = F.scaled_dot_product_attention(q, state.keys(), state.values(), attn_mask=mask)
        return decode_linear(self.out_proj, out.reshape(x_t.shape[0], self.d_model)), state
