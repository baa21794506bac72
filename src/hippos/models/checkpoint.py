"""Saving and loading H3LM: config.json + model.safetensors directories, official .pt files, Hub ids.

Files are written to a temporary name and renamed, so an interrupted save never leaves a half-written
model behind. Loading lists every missing or unexpected key instead of failing on the first.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .config import H3Config
from .lm import H3LM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_KEY = "lm_head.weight"  # the same tensor as the word embedding: stored once


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path (same folder, so the rename is atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_pretrained(model: H3LM, directory: str | Path) -> Path:
    """Write config.json and model.safetensors (tied head stored once) into directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: model.config.save(tmp))
    return directory


def load_state_dict_strict(model: H3LM, tensors: dict[str, Tensor], source: str) -> None:
    """Load tensors into model; every missing, unexpected or mis-shaped key is named in one error."""
    tensors = dict(tensors)
    embedding = tensors.get("backbone.embeddings.word_embeddings.weight")
    head = tensors.get(TIED_KEY)
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ValueError(f"{source}: lm_head.weight differs from the embedding, but hippos models tie the two")
    tensors[TIED_KEY] = embedding
    expected = model.state_dict()
    missing = sorted(k for k in expected if tensors.get(k) is None)
    unexpected = sorted(k for k in tensors if k not in expected)
    wrong = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tensors.get(k) is not None and tensors[k].shape != v.shape
    )
    if missing or unexpected or wrong:
        parts = [f"{source} does not fit this model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(parts))
    model.load_state_dict(tensors, strict=True)


def load_directory(directory: str | Path, device=None, dtype=None) -> H3LM:
    """Load a directory written by save_pretrained."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}; expected a directory written by save_pretrained")
    config = H3Config.load(directory / CONFIG_NAME)
    try:
        tensors = load_file(directory / WEIGHTS_NAME)
    except SafetensorError as err:
        raise ValueError(f"{directory / WEIGHTS_NAME} is damaged or truncated ({err}); save the model again") from err
    model = H3LM(config)
    load_state_dict_strict(model, tensors, str(directory / WEIGHTS_NAME))
    return model.to(device=device, dtype=dtype).eval()


def from_pretrained(source: str | Path, device=None, dtype=None, **convert_options) -> H3LM:
    """A model in eval mode from a save_pretrained directory, an official H3 .pt file, or a Hub id.

    convert_options (n_head, ...) go to the official-checkpoint converter when one is used.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return load_directory(path, device, dtype)
    if path.is_file():
        from .official import load_official

        return load_official(path, **convert_options).to(device=device, dtype=dtype).eval()
    if not _could_be_hub_id(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory")
    return _from_hub(str(source), device, dtype, **convert_options)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # NAME or OWNER/NAME


def _could_be_hub_id(source: str) -> bool:
    """Whether a path that does not exist here may name a Hub repository (runs/demo/typo cannot: two slashes)."""
    return bool(HUB_ID.fullmatch(source)) and ".." not in source and Path(source).suffix not in (".pt", ".ckpt", ".bin")


def _from_hub(repo_id: str, device, dtype, **convert_options) -> H3LM:
    """Download a Hub repository (ours: config.json + model.safetensors; official: model*.pt) and load it."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise ImportError(
            f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: pip install 'hungry-hippos[hf]'"
        ) from None
    try:
        files = list_repo_files(repo_id)
    except Exception as err:  # offline, unknown repo, no permission: say which, and what to do instead
        raise OSError(
            f"{repo_id!r} is no local file or folder, and the Hugging Face Hub could not be asked for it "
            f"({type(err).__name__}: {err}); if you are offline, download the files elsewhere and pass a local "
            "folder or .pt file"
        ) from err
    if CONFIG_NAME in files and WEIGHTS_NAME in files:
        local = snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        return load_directory(local, device, dtype)
    official = sorted(f for f in files if f.endswith(".pt"))
    filename = convert_options.pop("filename", None) or (official[0] if len(official) == 1 else None)
    if filename is None:
        raise ValueError(f"{repo_id} holds several checkpoints {official}; pass filename=... to choose one")
    from huggingface_hub import hf_hub_download

    from .official import load_official

    local = hf_hub_download(repo_id, filename)
    return load_official(local, **convert_options).to(device=device, dtype=dtype).eval()
