"""Saving and loading models: config.json + model.safetensors directories, official .pt files, Hub ids.

Files are written to a temporary name and renamed (hippos.data.files.atomic_write), so an interrupted save
never leaves a half-written model behind. Loading lists every missing, unexpected or mis-shaped key in one
error (`check_keys`), for our own files and official ones alike (these in the file's own names).

A quantized model (models/quantize.py) saves its int8 tensors and scales under its own keys (`lm_head.qweight`,
`...fc1.scale`) and records the method in config.json ("quantization": "int8", beside the H3Config fields);
loading builds that layout before the tensors go in (docs/quantization.md).

This module never imports the model class: `H3LM.from_pretrained` passes itself to `load_pretrained`, so imports
run one way (lm.py -> checkpoint.py -> official.py -> config.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..data.files import atomic_write
from .config import H3Config
from .official import EMBEDDING, TIED_KEY, convert_official_state_dict, official_name, read_checkpoint
from .quantize import NONE, int8_layout, quantization_of

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
QUANTIZATION_KEY = "quantization"  # config.json: how the weights are stored, when not as floats ("int8")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # NAME or OWNER/NAME

Model = TypeVar("Model", bound=nn.Module)


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write model.config as config.json and the weights as model.safetensors (tied head stored once)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: _save_config(model, tmp))
    return directory


def _save_config(model: nn.Module, path: str) -> None:
    """model.config as JSON, with the quantization recorded when the model has one."""
    quantization = quantization_of(model)
    if quantization == NONE:
        return model.config.save(path)  # float models: the file stays what it always was
    with open(path, "w") as f:
        json.dump({**model.config.to_dict(), QUANTIZATION_KEY: quantization}, f, indent=2)


def load_pretrained(cls: type[Model], source: str | Path, device=None, dtype=None, **convert_options) -> Model:
    """cls(config) in eval mode, loaded from a save_pretrained directory, an official H3 .pt file or a Hub id.

    convert_options (n_head, vocab_size; filename for a Hub repository holding several .pt files) go to the
    official-checkpoint converter when one is used.
    """
    path = _local_path(source, convert_options)
    quantization = NONE
    if path.is_dir():
        config, tensors = read_directory(path)
        quantization = read_quantization(path)
        model = cls(config) if quantization == NONE else int8_layout(cls(config), quantization)
        check_keys(_shapes(model), tensors, f"{path / WEIGHTS_NAME} does not fit this model:")
    else:
        config, tensors = read_official(path, **convert_options)
        # A misfit official file is refused before any weight is initialised: shapes come from a model on the
        # meta device. Not for our own directories, which save_pretrained wrote to fit: the first meta model in
        # a process costs seconds (measured 5.6 s: PyTorch warms up its meta kernels), added to every load.
        with torch.device("meta"):
            expected = _shapes(cls(config))
        check_keys(expected, tensors, f"{path}: {_misfit(config)}", official_name)
        model = cls(config)
    tied = {TIED_KEY: tensors[EMBEDDING]} if quantization == NONE else {}  # a quantized head has its own int8 copy
    model.load_state_dict({**tensors, **tied}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    """{key: shape} of the model's state dict, without the tied head (stored once, as the embedding)."""
    return {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}


def check_keys(
    expected: Mapping[str, torch.Size],
    tensors: Mapping[str, Tensor],
    header: str,
    file_name: Callable[[str], str] | None = None,
) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped key, under `header`.

    expected: {our key: shape} of the model; tensors: {our key: tensor} from the file. file_name turns one of
    our keys into the file's own name for it (official checkpoints), so the message names what the user has.
    """
    name = file_name or (lambda key: key)
    missing = sorted(name(k) for k in expected if k not in tensors)
    unexpected = sorted(name(k) for k in tensors if k not in expected)
    wrong = sorted(
        f"{name(k)}: file {tuple(t.shape)} vs model {tuple(expected[k])}"
        for k, t in tensors.items()
        if k in expected and t.shape != expected[k]
    )
    if missing or unexpected or wrong:
        parts = [header]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(parts))


def read_directory(directory: str | Path) -> tuple[H3Config, dict[str, Tensor]]:
    """(config, tensors) of a directory written by save_pretrained; the tied head is checked and left out."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}; expected a directory written by save_pretrained")
    with open(directory / CONFIG_NAME) as f:
        fields = json.load(f)
    fields.pop(QUANTIZATION_KEY, None)  # read_quantization's; not an H3Config field
    config = H3Config.from_dict(fields)
    weights = directory / WEIGHTS_NAME
    try:
        tensors = load_file(weights)
    except SafetensorError as err:
        raise ValueError(f"{weights} is damaged or truncated ({err}); save the model again") from err
    head, embedding = tensors.pop(TIED_KEY, None), tensors.get(EMBEDDING)
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ValueError(f"{weights}: {TIED_KEY} differs from the embedding, but hippos models tie the two")
    return config, tensors


def read_quantization(directory: str | Path) -> str:
    """How the weights in a save_pretrained directory are stored: "none" (floats) or a quantize() method."""
    with open(Path(directory) / CONFIG_NAME) as f:
        return json.load(f).get(QUANTIZATION_KEY, NONE)


def read_official(path: str | Path, n_head: int | None = None, *, vocab_size: int | None = None):
    """(config, tensors under our names, tied head left out) of an official H3 .pt file; errors name the file."""
    obj = read_checkpoint(path)
    try:
        config, tensors = convert_official_state_dict(obj, n_head, vocab_size=vocab_size)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    del tensors[TIED_KEY]  # the embedding again, as in read_directory
    return config, tensors


def _misfit(config: H3Config) -> str:
    """The head of an official file's misfit message: the shapes its tensors decided."""
    return (
        f"the checkpoint does not fit the H3 model its shapes describe (d_model {config.d_model}, {config.n_layer} "
        f"layers, attention layers {list(config.attn_layer_idx)}, d_state {config.d_state}, head_dim "
        f"{config.head_dim}):"
    )


# ---- where the files are ----------------------------------------------------------------------------------
def _local_path(source: str | Path, convert_options: dict) -> Path:
    """A local directory or file for source; a Hub id is downloaded first (pops convert_options' filename)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not _could_be_hub_id(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory")
    return _download(str(source), convert_options.pop("filename", None))


def _could_be_hub_id(source: str) -> bool:
    """Whether a path that does not exist here may name a Hub repository (runs/demo/typo cannot: two slashes)."""
    return bool(HUB_ID.fullmatch(source)) and ".." not in source and Path(source).suffix not in (".pt", ".ckpt", ".bin")


def _download(repo_id: str, filename: str | None) -> Path:
    """Fetch a Hub repository's model (ours: config.json + model.safetensors; official: one model*.pt) here."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download
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
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    official = sorted(f for f in files if f.endswith(".pt"))
    if not official:
        raise ValueError(f"{repo_id} holds neither {CONFIG_NAME} + {WEIGHTS_NAME} nor an official .pt checkpoint")
    filename = filename or (official[0] if len(official) == 1 else None)
    if filename is None:
        raise ValueError(f"{repo_id} holds several checkpoints {official}; pass filename=... to choose one")
    return Path(hf_hub_download(repo_id, filename))
