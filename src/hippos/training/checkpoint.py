"""Training checkpoints: written atomically, the previous one kept until the new one is complete.

A run directory holds `checkpoint.pt` (newest) and `checkpoint.prev.pt` (the one before). Saving writes a
temporary file, moves the current checkpoint to `.prev`, then renames the temporary into place: at every
moment at least one complete checkpoint exists. Loading uses torch.load(weights_only=True) and refuses a
damaged file with a message naming it; `latest_checkpoint` falls back to the previous one.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..data.files import atomic_write

LATEST, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def save_checkpoint(run_dir: str | Path, payload: dict) -> Path:
    """Write payload (tensors, numbers, strings, lists, dicts) as the run's newest checkpoint."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        # Only once the new file is complete does the current one become the previous one.
        if latest.exists():
            os.replace(latest, run_dir / PREVIOUS)

    return atomic_write(latest, write)


def load_checkpoint(path: str | Path) -> dict:
    """Read one checkpoint; a truncated or foreign file raises ValueError naming it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path} is damaged or truncated and cannot be loaded ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or "step" not in payload:
        raise ValueError(f"{path} is not a hippos training checkpoint")
    return payload


def latest_checkpoint(run_dir: str | Path) -> dict | None:
    """The newest complete checkpoint of a run (the previous one if the newest is damaged), or None."""
    run_dir = Path(run_dir)
    errors = []
    for name in (LATEST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return load_checkpoint(path)
        except ValueError as err:
            errors.append(str(err))
            warnings.warn(f"{err}; trying the previous checkpoint", stacklevel=2)
    if errors:
        raise ValueError("no complete checkpoint in " + str(run_dir) + ": " + "; ".join(errors))
    return None
