"""The official H3 checkpoints (model.pt files, docs/checkpoints.md) -> (H3Config, our state dict).

This module reads and converts; it never builds a model, so the models package imports one way
(checkpoint.py -> official.py -> config.py). `hippos.models.checkpoint.load_pretrained` builds the model and
checks that the converted tensors fit it, naming every misfit key by its name in the file (`official_name`).

Our module names are the official ones, except inside the H3 mixer, whose SSM parameters
`convert_h3_mixer` renames per layer (OFFICIAL_H3_NAMES). Everything else is read off the tensors:

- d_model, padded vocabulary: the word embedding (rows, D).
- n_layer: the highest backbone.layers.{i} index + 1; attention layers: those with mixer.Wqkv.
- d_state: the shift SSM's B (D, N); the diagonal SSM must have N / 2 modes.
- head_dim: d_model / the number of diagonal-SSM channels; d_inner: the rows of mlp.fc1.
- rotary_dim: 2 * len(rotary_emb.inv_freq). The buffer itself is not saved by H3LM (it is computed), so it
  is checked against 1 / 10000^(2i / rotary_dim) and dropped.
- vocab_size: the embedding is padded, the real vocabulary is not stored. 50264 rows are GPT-2's 50257
  padded to a multiple of 8 (every published model); any other row count R is taken as the vocabulary itself,
  padded to a multiple of 8 when R % 8 == 0 (so the config reads like the published ones) and of 1 otherwise.
  Pass vocab_size=... to state the real vocabulary.
- n_head: not in the shapes. Unless given, it comes from the published models by d_model (768: 12,
  1024: 16, 2048: 16, 2560: 20); another d_model with attention layers needs n_head=... . Without attention
  layers it does not matter and is set to 1.

Layouts accepted (docs/checkpoints.md): a plain state dict; a PyTorch Lightning checkpoint (every weight under
"state_dict" with a "model." prefix); older key names ("s4seq.encoder." for "backbone.", "embedding." for
"backbone.embeddings.word_embeddings."), and an extra LayerNorm "backbone.norm" right after the embedding.

That extra norm marks the old block order "mixer -> add -> LN" (the residual stream itself is never
normalised; each LN output feeds the next sub-layer). It is the same computation as our pre-norm blocks with
every LayerNorm moved one slot later:

    new layer l norm1 <- old layer l-1 norm2   (layer 0: backbone.norm)
    new layer l norm2 <- old layer l norm1
    new ln_f          <- old last layer norm2

The old last norm2 is the old model's final norm, so an ln_f stored beside it has no place in that forward
pass; it is dropped with a warning (the official loader overwrote it the same way).

Nothing else is dropped silently: the tied lm_head must equal the embedding, and (at load time) every key
that does not fit is listed in one ValueError, together with every missing one.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .config import H3Config

PUBLISHED_N_HEAD = {768: 12, 1024: 16, 2048: 16, 2560: 20}  # d_model -> heads of the published models
GPT2_VOCAB, GPT2_PADDED = 50257, 50264
LIGHTNING_TAG = "pytorch-lightning_version"
LIGHTNING_PREFIX = "model."
OLD_PREFIXES = (("s4seq.encoder.", "backbone."), ("embedding.", "backbone.embeddings.word_embeddings."))
EMBEDDING = "backbone.embeddings.word_embeddings.weight"
TIED_KEY = "lm_head.weight"  # the same tensor as the word embedding in every H3 language model
EXTRA_NORM = "backbone.norm"  # old layout: LayerNorm right after the embedding
FINAL_NORM = "backbone.ln_f"
ROTARY_BASE = 10000.0
_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.(.+)")

# One H3 mixer's official parameter names -> ours (layers/h3.py). Only the SSM internals differ; the official
# C tensors carry a leading output-channel axis of 1, which our layers do not have.
OFFICIAL_H3_NAMES = {
    "ssm_k_kernel.kernel.B": "shift.B",
    "ssm_k_kernel.kernel.C": "shift.C",
    "kernel.kernel.log_dt": "diag.log_dt",
    "kernel.kernel.inv_A_real": "diag.inv_A_real",
    "kernel.kernel.A_imag": "diag.A_imag",
    "kernel.kernel.B": "diag.B",
    "kernel.kernel.C": "diag.C",
}
_OFFICIAL_SQUEEZED = {"ssm_k_kernel.kernel.C", "kernel.kernel.C"}
_OURS_TO_OFFICIAL = {ours: official for official, ours in OFFICIAL_H3_NAMES.items()}


# ---- public entry points ---------------------------------------------------------------------------------
def convert_official_state_dict(
    official: Mapping[str, Tensor], n_head: int | None = None, *, vocab_size: int | None = None
) -> tuple[H3Config, dict[str, Tensor]]:
    """Official {name: tensor} -> (the H3Config they describe, the same tensors under our names, tied head included).

    Accepts every layout of docs/checkpoints.md (a Lightning checkpoint is unwrapped here too); raises ValueError
    for what cannot be read or does not hold together. Whether every tensor fits H3LM(config) is checked where
    the model is built (checkpoint.load_pretrained), in the file's names (official_name).
    """
    tensors = _rename_old_keys(unwrap_official(official))
    layers = _layer_indices(tensors)
    n_layer = max(layers) + 1
    if EXTRA_NORM + ".weight" in tensors or EXTRA_NORM + ".bias" in tensors:
        _shift_layer_norms(tensors, n_layer)
    _drop_tied_head(tensors)
    attn = tuple(sorted(i for i in layers if f"backbone.layers.{i}.mixer.Wqkv.weight" in tensors))
    rotary_dim = _take_rotary(tensors, attn)
    config = _infer_config(tensors, n_layer, attn, rotary_dim, n_head, vocab_size)
    converted = _rename_mixers(tensors, config)
    converted[TIED_KEY] = converted[EMBEDDING]  # _infer_config has checked that the embedding is there
    return config, converted


def read_checkpoint(path: str | Path) -> object:
    """torch.load(path, weights_only=True), with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: ([^\n]*)", str(err))
        if found is None:
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint ({_first_line(err)}); is it damaged?"
            ) from err
        raise ValueError(
            f"{path} holds Python objects other than tensors and plain containers ({found.group(1).strip()}). "
            "hippos loads checkpoints with weights_only=True because unpickling arbitrary objects can run code. "
            "If you trust the file, load it yourself with torch.load(..., weights_only=False), keep only its "
            "state dict (a dict of tensors) and torch.save that."
        ) from err
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # torch reports a cut-off file as RuntimeError, OSError, EOFError, KeyError, ...
        raise ValueError(
            f"{path} is damaged or truncated and cannot be read as a PyTorch checkpoint "
            f"({type(err).__name__}: {_first_line(err)}); download or copy it again"
        ) from err


def unwrap_official(obj: object) -> dict[str, Tensor]:
    """The flat {name: tensor} dict inside a loaded checkpoint: plain, or PyTorch Lightning ("model." keys)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a dict of tensors), found a {type(obj).__name__}")
    if LIGHTNING_TAG in obj:
        inner = obj.get("state_dict")
        if not isinstance(inner, Mapping):
            raise ValueError("a PyTorch Lightning checkpoint without a 'state_dict' dict")
        stray = sorted(k for k in inner if not str(k).startswith(LIGHTNING_PREFIX))
        if stray:
            raise ValueError(
                f"Lightning checkpoint: unexpected keys without the {LIGHTNING_PREFIX!r} prefix "
                f"({len(stray)}): " + ", ".join(map(str, stray))
            )
        obj = {k[len(LIGHTNING_PREFIX) :]: v for k, v in inner.items()}
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor))
    if bad:
        raise ValueError(
            f"expected a state dict of tensors; these entries are not tensors ({len(bad)}): {', '.join(bad[:20])}"
            + (" ..." if len(bad) > 20 else "")
        )
    return dict(obj)


# ---- layout ----------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _rename_old_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old prefixes -> current ones; refuse a file that holds both spellings of one key."""
    renamed: dict[str, Tensor] = {}
    clashes = []
    for key, tensor in tensors.items():
        new = key
        for old, current in OLD_PREFIXES:
            if new.startswith(old):
                new = current + new[len(old) :]
        if new in renamed:
            clashes.append(new)
        renamed[new] = tensor
    if clashes:
        raise ValueError(f"keys stored under both their old and current names: {', '.join(sorted(clashes))}")
    return renamed


def _layer_indices(tensors: Mapping[str, Tensor]) -> set[int]:
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.fullmatch, tensors) if m}
    if not layers:
        sample = ", ".join(sorted(tensors)[:8]) or "none"
        raise ValueError(f"no backbone.layers.* keys: not an H3 language model checkpoint (keys: {sample} ...)")
    return layers


def _shift_layer_norms(tensors: dict[str, Tensor], n_layer: int) -> None:
    """Old "mixer -> add -> LN" blocks -> pre-norm blocks: every LayerNorm moves one slot (module docstring)."""
    stale = [k for k in (FINAL_NORM + ".weight", FINAL_NORM + ".bias") if k in tensors]
    if stale:
        warnings.warn(
            f"old-layout checkpoint (with {EXTRA_NORM}) also holds {', '.join(stale)}; in that layout the last "
            "layer's norm2 is the final norm, so the stored ln_f is ignored",
            stacklevel=3,
        )
        for k in stale:
            del tensors[k]
    moves = {FINAL_NORM: f"backbone.layers.{n_layer - 1}.norm2"}
    for l in range(n_layer):
        moves[f"backbone.layers.{l}.norm1"] = f"backbone.layers.{l - 1}.norm2" if l else EXTRA_NORM
        moves[f"backbone.layers.{l}.norm2"] = f"backbone.layers.{l}.norm1"
    sources = {f"{src}.{p}" for src in moves.values() for p in ("weight", "bias")}
    missing = sorted(k for k in sources if k not in tensors)
    if missing:
        raise ValueError(
            f"old-layout checkpoint (with {EXTRA_NORM}): LayerNorm keys missing ({len(missing)}): " + ", ".join(missing)
        )
    taken = {k: tensors.pop(k) for k in sources}
    for dst, src in moves.items():
        for p in ("weight", "bias"):
            tensors[f"{dst}.{p}"] = taken[f"{src}.{p}"]


def _drop_tied_head(tensors: dict[str, Tensor]) -> None:
    head = tensors.pop(TIED_KEY, None)
    if head is None:
        return
    embedding = tensors.get(EMBEDDING)
    if embedding is None:
        raise ValueError(f"{TIED_KEY} is present but the word embedding {EMBEDDING} is missing")
    if head.shape != embedding.shape or not torch.equal(head, embedding):
        raise ValueError(
            f"{TIED_KEY} differs from the word embedding: this checkpoint's LM head is not tied to its embedding, "
            "but H3 language models (and H3LM) share one matrix for both"
        )


def _take_rotary(tensors: dict[str, Tensor], attn: tuple[int, ...]) -> int:
    """Check and remove every attention layer's rotary_emb.inv_freq; return the rotary dim (0: none)."""
    keys = {a: f"backbone.layers.{a}.mixer.rotary_emb.inv_freq" for a in attn}
    present = {a: tensors[k] for a, k in keys.items() if k in tensors}
    if not present:
        return 0
    if len(present) != len(attn):
        without = [a for a in attn if a not in present]
        raise ValueError(f"rotary_emb.inv_freq in attention layers {sorted(present)} but not in {without}")
    sizes = {tuple(t.shape) for t in present.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"rotary_emb.inv_freq must be one 1-D size in every attention layer, got {sorted(sizes)}")
    rotary_dim = 2 * next(iter(sizes))[0]
    expected = 1.0 / ROTARY_BASE ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    for a, inv_freq in present.items():
        rtol = max(1e-5, 4 * torch.finfo(inv_freq.dtype).eps)
        if not torch.allclose(inv_freq.double(), expected, rtol=rtol, atol=0.0):
            raise ValueError(
                f"{keys[a]} differs from 1 / {ROTARY_BASE:g}^(2i / {rotary_dim}): another rotary base or "
                "frequency layout, which H3LM does not support"
            )
        del tensors[keys[a]]
    return rotary_dim


# ---- config ----------------------------------------------------------------------------------------------
def _infer_config(
    tensors: Mapping[str, Tensor],
    n_layer: int,
    attn: tuple[int, ...],
    rotary_dim: int,
    n_head: int | None,
    vocab_size: int | None,
) -> H3Config:
    """The H3Config that the tensors' shapes describe (rules in the module docstring)."""
    rows, d_model = _embedding_shape(tensors)
    vocab_size, pad_multiple = _vocabulary(rows, vocab_size)
    fc1 = _first(tensors, "mlp.fc1.weight", range(n_layer))
    d_inner = 0 if fc1 is None or fc1.shape[0] == 4 * d_model else int(fc1.shape[0])
    d_state, head_dim = _ssm_sizes(tensors, [i for i in range(n_layer) if i not in attn], d_model)
    return H3Config(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab_size,
        pad_vocab_size_multiple=pad_multiple,
        attn_layer_idx=attn,
        ssm_mixer="h3",
        n_head=_heads(d_model, attn, n_head),
        rotary_dim=rotary_dim,
        d_inner=d_inner,
        d_state=d_state,
        head_dim=head_dim,
    )


def _first(tensors: Mapping[str, Tensor], suffix: str, layers) -> Tensor | None:
    """The first of `layers` that holds backbone.layers.{i}.{suffix}: its tensor, or None."""
    return next((tensors[k] for i in layers if (k := f"backbone.layers.{i}.{suffix}") in tensors), None)


def _embedding_shape(tensors: Mapping[str, Tensor]) -> tuple[int, int]:
    """(rows, d_model) of the word embedding, which must be there and 2-D."""
    embedding = tensors.get(EMBEDDING)
    if embedding is None or embedding.dim() != 2:
        found = "missing" if embedding is None else f"shape {tuple(embedding.shape)}"
        raise ValueError(f"the word embedding {EMBEDDING} must be (vocabulary, d_model); it is {found}")
    return int(embedding.shape[0]), int(embedding.shape[1])


def _ssm_sizes(tensors: Mapping[str, Tensor], ssm_layers: list[int], d_model: int) -> tuple[int, int]:
    """(d_state, head_dim) from the shift SSM's B (D, N) and the diagonal SSM's inv_A_real (H, N / 2)."""
    d_state, head_dim = 64, 1  # H3Config's defaults, for a model without H3 layers
    shift_B = _first(tensors, "mixer.ssm_k_kernel.kernel.B", ssm_layers)
    if shift_B is not None:
        if shift_B.dim() != 2:
            raise ValueError(f"shift SSM B must be (d_model, d_state), got shape {tuple(shift_B.shape)}")
        d_state = int(shift_B.shape[1])
    modes = _first(tensors, "mixer.kernel.kernel.inv_A_real", ssm_layers)
    if modes is None:
        return d_state, head_dim
    if modes.dim() != 2:
        raise ValueError(f"diagonal SSM inv_A_real must be (channels, modes), got shape {tuple(modes.shape)}")
    if shift_B is None:
        d_state = 2 * int(modes.shape[1])
    elif 2 * modes.shape[1] != d_state:
        raise ValueError(
            f"the diagonal SSM has {modes.shape[1]} modes but the shift SSM has d_state {d_state}; H3LM needs "
            "modes = d_state / 2"
        )
    channels = int(modes.shape[0])
    if channels < 1 or d_model % channels:
        raise ValueError(f"the diagonal SSM has {channels} channels, which does not divide d_model {d_model}")
    return d_state, d_model // channels


def _heads(d_model: int, attn: tuple[int, ...], n_head: int | None) -> int:
    """Attention heads: as given, else the published models' for this d_model (the shapes do not hold it)."""
    if n_head is not None:
        return int(n_head)
    if d_model in PUBLISHED_N_HEAD:
        return PUBLISHED_N_HEAD[d_model]
    if attn:
        raise ValueError(
            f"d_model {d_model} is not one of the published H3 models {sorted(PUBLISHED_N_HEAD)} and the number "
            f"of attention heads cannot be read from the tensors: pass n_head=... (attention layers {list(attn)})"
        )
    return 1  # no attention layer: any divisor of d_model will do


def _vocabulary(rows: int, vocab_size: int | None) -> tuple[int, int]:
    """(vocab_size, pad multiple) whose padded size is the embedding's `rows` (rule in the module docstring)."""
    if vocab_size is None:
        if rows == GPT2_PADDED:
            return GPT2_VOCAB, 8
        return rows, 8 if rows % 8 == 0 else 1
    if not 1 <= vocab_size <= rows:
        raise ValueError(f"vocab_size {vocab_size} must be between 1 and the embedding's {rows} rows")
    for multiple in (8, 1, rows):  # the first one that pads vocab_size to exactly `rows`
        if math.ceil(vocab_size / multiple) * multiple == rows:
            return vocab_size, multiple
    raise AssertionError("unreachable: a multiple of `rows` always fits")


# ---- names -----------------------------------------------------------------------------------------------
def convert_h3_mixer(official: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One official H3 mixer's tensors (names relative to the mixer) -> layers.H3's names and shapes."""
    converted = {}
    for name, tensor in official.items():
        if name in _OFFICIAL_SQUEEZED:
            if tensor.shape[0] != 1:
                raise ValueError(f"{name}: expected one output channel (leading axis 1), got {tuple(tensor.shape)}")
            tensor = tensor[0]
        converted[OFFICIAL_H3_NAMES.get(name, name)] = tensor
    return converted


def official_name(key: str) -> str:
    """The official file's name for one of our state-dict keys (H3 SSM internals renamed back; the rest agree)."""
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2).startswith("mixer."):
        name = m.group(2)[len("mixer.") :]
        if name in _OURS_TO_OFFICIAL:
            return f"backbone.layers.{m.group(1)}.mixer.{_OURS_TO_OFFICIAL[name]}"
    return key


def _rename_mixers(tensors: dict[str, Tensor], config: H3Config) -> dict[str, Tensor]:
    """Our names for every H3 mixer's tensors; every other key is already ours."""
    converted: dict[str, Tensor] = {}
    per_layer: dict[int, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LAYER_KEY.fullmatch(key)
        if m and config.mixer(int(m.group(1))) == "h3" and m.group(2).startswith("mixer."):
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)[len("mixer.") :]] = tensor
        else:
            converted[key] = tensor
    for layer, mixer in per_layer.items():
        prefix = f"backbone.layers.{layer}.mixer."
        try:
            ours = convert_h3_mixer(mixer)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from err
        converted.update((prefix + name, tensor) for name, tensor in ours.items())
    return converted
