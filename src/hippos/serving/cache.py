"""The state cache: the model's state after a token sequence, kept within a byte budget (docs/serving.md).

A follow-up request usually resends its whole conversation. With the state after the earlier part kept, only
the new tokens need a prefill. Entries are keyed by their exact token sequence; `lookup` finds the longest key
that is a prefix of the tokens asked for. When the entries outgrow the budget, the least recently used go first.

Lookup stays fast with thousands of entries and long prompts: keys are indexed by length, and within a length
by a hash of their tokens, so a lookup asks one dict per key length that exists. The hash of a prefix is built
from a chain over whole blocks of BLOCK tokens plus the rest, so one pass of tuple hashing (in C, a Python step
per block) serves every length. A hash match is confirmed by comparing the tokens themselves.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.lm import LMState

BLOCK = 64  # tokens per link of the hash chain
KEY_BYTES_PER_TOKEN = 8  # a key holds one pointer per token (small ints are shared by Python)


@dataclass
class _Entry:
    state: LMState  # a compact copy that no request ever writes to
    nbytes: int  # its tensors' bytes plus the key's
    digest: int  # hash of the whole key


def state_bytes(state: LMState) -> int:
    """Bytes of a state's tensors, as `to_tensors` names them."""
    return sum(t.numel() * t.element_size() for t in state.to_tensors().values())


def _owned(t: Tensor) -> Tensor:
    """t itself when it is the whole of its own storage, else a contiguous copy of just its elements."""
    exact = t.is_contiguous() and t.storage_offset() == 0
    if exact and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def compact_copy(state: LMState) -> LMState:
    """A state equal to `state` that holds only its own elements: no spare KV capacity, no unused slots.

    `concat` of one state right-aligns its rows and drops the slots no row uses (docs/state.md); it allocates
    new tensors, so the copy shares nothing with a state that a running batch keeps extending.
    """
    trimmed = LMState.concat([state])
    tensors = {name: _owned(t) for name, t in trimmed.to_tensors().items()}
    return LMState.from_tensors(tensors, trimmed.type_names())


class StateCache:
    """Model states (one row each) keyed by the tokens they follow; least recently used out past the budget.

    Used by one thread (the engine's); its counters may be read from any thread.
    """

    def __init__(self, budget_bytes: int):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be an integer >= 0 (0 keeps nothing), got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.hits = 0  # lookups that found a prefix
        self.misses = 0  # lookups that found none
        self.bytes = 0  # bytes held by the entries
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # oldest use first
        self._index: dict[int, dict[int, tuple[int, ...]]] = {}  # key length -> {prefix hash: key}
        self._lengths: list[int] = []  # the key lengths present, sorted
        self._salt = random.getrandbits(61)  # starts the chain: colliding keys cannot be planned

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def _chain(self, tokens: tuple[int, ...], upto: int) -> list[int]:
        """chain[j] = hash of tokens[: j * BLOCK], for every whole block within the first `upto` tokens."""
        chain = [self._salt]
        for start in range(0, upto - BLOCK + 1, BLOCK):
            chain.append(hash((chain[-1], tokens[start : start + BLOCK])))
        return chain

    def _hash(self, tokens: tuple[int, ...], length: int, chain: list[int]) -> int:
        """The hash of tokens[:length], from the chain up to its last whole block (length <= the chain's upto)."""
        whole = length // BLOCK
        return hash((chain[whole], tokens[whole * BLOCK : length]))

    def lookup(self, tokens: Sequence[int]) -> tuple[int, LMState | None]:
        """(n, state after tokens[:n]) for the longest cached key that is a prefix of tokens; (0, None) if none.

        The state returned is shared with the cache: continue from it (states are values), never write into it.
        """
        tokens = tuple(tokens)
        fits = bisect.bisect_right(self._lengths, len(tokens))
        if fits:
            chain = self._chain(tokens, self._lengths[fits - 1])
            for length in reversed(self._lengths[:fits]):
                key = self._index[length].get(self._hash(tokens, length, chain))
                if key is not None and key == tokens[:length]:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return length, self._entries[key].state
        self.misses += 1
        return 0, None

    def insert(self, tokens: Sequence[int], state: LMState) -> bool:
        """Keep a copy of `state`, the state after `tokens` (one row); False when it is not kept.

        Not kept: a state larger than the whole budget, or (vanishingly rare) a key whose hash another key of
        the same length already has. Inserting a key that is present only marks it as recently used.
        """
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            raise ValueError("a cache key needs at least one token (the empty prefix is the model's initial state)")
        if state.batch_size != 1:
            raise ValueError(f"the cache keeps states of one row, got {state.batch_size} rows: select(row) first")
        if tokens in self._entries:
            self._entries.move_to_end(tokens)
            return True
        digest = self._hash(tokens, len(tokens), self._chain(tokens, len(tokens)))
        if digest in self._index.get(len(tokens), {}) or self.budget_bytes == 0:
            return False
        copy = compact_copy(state)
        nbytes = state_bytes(copy) + KEY_BYTES_PER_TOKEN * len(tokens)
        if nbytes > self.budget_bytes:
            return False
        self._add(tokens, _Entry(copy, nbytes, digest))
        while self.bytes > self.budget_bytes:
            self._remove(next(iter(self._entries)))
        return True

    def _add(self, key: tuple[int, ...], entry: _Entry) -> None:
        self._entries[key] = entry
        if len(key) not in self._index:
            self._index[len(key)] = {}
            bisect.insort(self._lengths, len(key))
        self._index[len(key)][entry.digest] = key
        self.bytes += entry.nbytes

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        by_hash = self._index[len(key)]
        del by_hash[entry.digest]
        if not by_hash:
            del self._index[len(key)]
            self._lengths.remove(len(key))
        self.bytes -= entry.nbytes

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        for key in list(self._entries):
            self._remove(key)
