"""H3Config: one typed description for pure H3, hybrid H3-attention, Transformer and S4D language models."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

from ..config import check_numbers

MIXERS = ("h3", "attention", "s4d")
CHOICES = {  # the string fields and the values each may take
    "ssm_mixer": ("h3", "s4d"),
    "ssm_init": ("lin", "inv"),
    "discretization": ("bilinear", "zoh"),
    "ssm_mode": ("auto", "fft", "chunked"),
}
MODEL_TYPE = "h3"  # config.json's model_type, under which transformers' Auto classes know these models


HF_CONFIG_KEYS = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "use_cache",
}  # fmt: skip


@dataclass
class H3Config:
    """Shape and options of an H3 language model (docs/models.md)."""

    d_model: int = 768  # width of the residual stream
    n_layer: int = 12  # number of blocks
    vocab_size: int = 50257  # real vocabulary size (GPT-2's by default)
    pad_vocab_size_multiple: int = 8  # the embedding is padded up to a multiple of this
    attn_layer_idx: tuple[int, ...] = ()  # blocks whose mixer is attention
    ssm_mixer: str = "h3"  # mixer of every other block: "h3" or "s4d"
    n_head: int = 12  # attention heads
    rotary_dim: int = 0  # rotary embedding on the first rotary_dim features of each head (0: none)
    d_inner: int = 0  # MLP hidden width (0: 4 * d_model)
    d_state: int = 64  # SSM state size N (the diagonal SSM has N / 2 complex modes)
    head_dim: int = 1  # H3 head dimension (1 in every published model)
    ssm_init: str = "lin"  # diagonal SSM initialisation: "lin" (S4D-Lin) or "inv" (S4D-Inv)
    discretization: str = "bilinear"  # diagonal SSM discretisation: "bilinear" or "zoh"
    dt_min: float = 1e-3  # smallest initial SSM step size
    dt_max: float = 1e-1  # largest initial SSM step size
    ssm_mode: str = "auto"  # how SSMs run a sequence: "auto", "fft" or "chunked"
    embed_dropout: float = 0.0  # dropout on the embeddings
    resid_dropout: float = 0.0  # dropout on each mixer and MLP output before the residual add
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    initializer_range: float = 0.02  # std of Linear and Embedding weights at initialisation

    POSITIVE: ClassVar[tuple[str, ...]] = (
        "d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "n_head", "d_state", "head_dim", "dt_min",
        "dt_max", "layer_norm_eps", "initializer_range",
    )  # fmt: skip

    def __post_init__(self) -> None:
        """Refuse an ill-typed, out-of-range or inconsistent field, naming it: a config that exists is a valid one."""
        if isinstance(self.attn_layer_idx, list):  # JSON and TOML give lists
            self.attn_layer_idx = tuple(self.attn_layer_idx)
        check_numbers(self)
        self._check_choices()
        self._check_layers()
        self._check_sizes()

    def _check_choices(self) -> None:
        """Each string field holds one of its CHOICES."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def _check_layers(self) -> None:
        """attn_layer_idx names distinct existing blocks."""
        bad = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
        if bad or len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
            raise ValueError(f"attn_layer_idx {list(self.attn_layer_idx)} must name distinct blocks 0 .. "
                             f"{self.n_layer - 1}")  # fmt: skip

    def _check_sizes(self) -> None:
        """Sizes that must divide, pair up or order with each other do."""
        if self.attn_layer_idx and self.d_model % self.n_head:
            raise ValueError(f"n_head {self.n_head} must divide d_model {self.d_model}")
        if self.rotary_dim and (self.rotary_dim % 2 or self.rotary_dim > self.d_model // self.n_head):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and at most the head size")
        if self.d_model % self.head_dim:
            raise ValueError(f"head_dim {self.head_dim} must divide d_model {self.d_model}")
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (complex modes come in conjugate pairs), got {self.d_state}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min {self.dt_min} must not exceed dt_max {self.dt_max}")
        if max(self.embed_dropout, self.resid_dropout) >= 1:
            raise ValueError("embed_dropout and resid_dropout must be below 1")

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to pad_vocab_size_multiple (GPT-2's 50257 -> 50264)."""
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width."""
        return self.d_inner or 4 * self.d_model

    def mixer(self, layer: int) -> str:
        """Which mixer block `layer` uses: "h3", "attention" or "s4d"."""
        return "attention" if layer in self.attn_layer_idx else self.ssm_mixer

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists), tagged with model_type "h3" for transformers' Auto classes."""
        d = dataclasses.asdict(self)
        d["attn_layer_idx"] = list(self.attn_layer_idx)
        return {"model_type": MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict) -> H3Config:
        """Build from a dict, refusing unknown keys (a typo must not silently become a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        # Keys transformers adds when it writes a config.json are not ours to check.
        unknown = sorted(set(d) - names - HF_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown H3Config keys {unknown}; known keys: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str) -> None:
        """Write as config.json-style JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> H3Config:
        """Read a JSON file written by `save`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def preset(cls, name: str, **overrides) -> H3Config:
        """A named configuration (see PRESETS), with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_table(cls, values: dict, vocab_size: int) -> H3Config:
        """From a run file's [model] table: an optional `preset`, then fields; vocab_size from the data unless set."""
        values = dict(values)
        preset = values.pop("preset", None)
        values.setdefault("vocab_size", vocab_size)
        return cls.preset(preset, **values) if preset else cls(**values)


PRESETS = {
    # The published models (docs/models.md). Pure H3 / Transformer variants: change attn_layer_idx.
    "H3-125M": H3Config(d_model=768, n_layer=12, n_head=12, attn_layer_idx=(6,)),
    "H3-355M": H3Config(d_model=1024, n_layer=24, n_head=16, attn_layer_idx=(8, 16)),
    "H3-1.3B": H3Config(d_model=2048, n_layer=24, n_head=16, attn_layer_idx=(8, 16)),
    "H3-2.7B": H3Config(d_model=2560, n_layer=32, n_head=20, attn_layer_idx=(8, 16, 24)),
    "H3-2.7B-rotary": H3Config(d_model=2560, n_layer=32, n_head=20, attn_layer_idx=(10, 21), rotary_dim=64),
    # For tests and quick CPU runs.
    "tiny": H3Config(d_model=64, n_layer=2, n_head=4, vocab_size=257, d_state=16, attn_layer_idx=(1,)),
}
