"""Saving and restoring a model's recurrent state, so that a conversation continues from its state.

A state is the list `H3LM.forward(..., return_state=True)` returns, one entry per block: an H3State (shift
register + complex diagonal state), a complex tensor (S4D) or a KVCache (attention). For a pure H3 model its
size is fixed, whatever the length of the text behind it. Files are safetensors, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..layers import H3State
from ..layers.attention import KVCache
from ..models.checkpoint import atomic_write


def state_to_tensors(state: list) -> tuple[dict[str, Tensor], list[str]]:
    """Flatten a state to named real tensors and the kind of each layer ("h3", "s4d", "attention")."""
    tensors, kinds = {}, []
    for i, s in enumerate(state):
        if isinstance(s, H3State):
            kinds.append("h3")
            tensors[f"{i}.shift"] = s.shift
            tensors[f"{i}.diag"] = torch.view_as_real(s.diag)
        elif isinstance(s, KVCache):
            kinds.append("attention")
            tensors[f"{i}.k"], tensors[f"{i}.v"] = s.keys(), s.values()
            if s.pad is not None:
                tensors[f"{i}.pad"] = s.pad
        elif isinstance(s, Tensor) and s.is_complex():
            kinds.append("s4d")
            tensors[f"{i}.diag"] = torch.view_as_real(s)
        else:
            raise TypeError(f"layer {i}: a state of type {type(s).__name__} cannot be saved")
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, kinds


def state_from_tensors(tensors: dict[str, Tensor], kinds: list[str], device=None) -> list:
    """Inverse of state_to_tensors."""
    state = []
    for i, kind in enumerate(kinds):
        t = {k.split(".", 1)[1]: v.to(device) for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if kind == "h3":
            state.append(H3State(t["shift"], torch.view_as_complex(t["diag"].contiguous())))
        elif kind == "s4d":
            state.append(torch.view_as_complex(t["diag"].contiguous()))
        elif kind == "attention":
            length = t["k"].shape[2]
            state.append(KVCache(t["k"].clone(), t["v"].clone(), length, [length], t.get("pad")))
        else:
            raise ValueError(f"layer {i}: unknown state kind {kind!r}")
    return state


def save_state(state: list, path: str | Path) -> None:
    """Write a generation state to a safetensors file."""
    from safetensors.torch import save_file

    tensors, kinds = state_to_tensors(state)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"kinds": json.dumps(kinds)}))


def read_state(path: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """The named host tensors and layer kinds of a file written by save_state (see state_from_tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        kinds = json.loads((f.metadata() or {}).get("kinds", "null") or "null")
        if not isinstance(kinds, list):
            raise ValueError(f"{path} is not a hippos generation state (no layer kinds in its metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, kinds


def load_state(path: str | Path, device=None) -> list:
    """Read a state written by save_state, onto `device` (default: the CPU)."""
    return state_from_tensors(*read_state(path), device)
