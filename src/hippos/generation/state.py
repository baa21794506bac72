"""Saving and restoring a model's recurrent state, so that a conversation continues from its state.

A state is the LMState that `H3LM.forward(..., return_state=True)` and `generate(..., return_state=True)`
return. A file holds `LMState.to_tensors()` (named real tensors, "<layer>.<name>") as safetensors, and in its
metadata the state class of every layer, by the name it is registered under (layers/state.py), so the file
rebuilds the state without a model. For a pure H3 model its size is fixed, whatever the length of the text
behind it. Files are written atomically.

Files of the first format (metadata "kinds": "h3", "s4d", "attention", and "pad" for an attention layer's
starts) are read too.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..data.files import atomic_write
from ..models.lm import LMState

_OLD_KINDS = {"h3": "H3State", "s4d": "S4DState", "attention": "AttentionState"}


def save_state(state: LMState, path: str | Path) -> None:
    """Write a generation state to a safetensors file (on the host, whatever device the state is on)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.to_tensors().items()}
    metadata = {"state_types": json.dumps(state.type_names())}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_state(path: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """The named host tensors of a file written by save_state, and each layer's state class name."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if "state_types" in metadata:
        return tensors, json.loads(metadata["state_types"])
    kinds = json.loads(metadata.get("kinds", "null") or "null")
    if not isinstance(kinds, list):
        raise ValueError(f"{path} is not a hippos generation state (no state types in its metadata)")
    renamed = {k[: -len(".pad")] + ".start" if k.endswith(".pad") else k: v for k, v in tensors.items()}
    return renamed, [_OLD_KINDS.get(kind, kind) for kind in kinds]


def load_state(path: str | Path, device=None) -> LMState:
    """Read a state written by save_state, onto `device` (default: the CPU)."""
    tensors, types = read_state(path)
    return LMState.from_tensors({k: v.to(device) for k, v in tensors.items()}, types)
