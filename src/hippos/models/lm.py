"""H3LM: embedding, pre-norm blocks (any mixer per block), final norm, tied LM head (docs/models.md).

Module names follow the official checkpoints (backbone.embeddings.word_embeddings, backbone.layers.{i}.mixer,
.norm1, .norm2, .mlp.fc1, .mlp.fc2, backbone.ln_f, lm_head), so only the H3 SSM internals need a key map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import H3, S4D, MixerState, MultiHeadAttention, state_type
from ..layers.decode_linear import decode_linear
from ..ops import compute_dtype, linear_cross_entropy
from ..ops.checks import check_ids_in_range, values_known
from .checkpoint import load_pretrained, save_pretrained
from .config import H3Config


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, L, V) against labels (B, L), -100 ignored; float32 (float64 stays)."""
    return F.cross_entropy(logits.flatten(0, 1).to(compute_dtype(logits.dtype)), labels.flatten(), ignore_index=-100)


@dataclass
class LMState:
    """Every block's mixer state in block order, with the mixer states' own protocol (docs/state.md).

    Nothing here looks at a layer's state type: each operation is the layers' own, applied layer by layer.
    """

    layers: list[MixerState]  # one per block

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> MixerState:
        return self.layers[layer]

    def __iter__(self):
        return iter(self.layers)

    @property
    def batch_size(self) -> int:
        """Number of rows (sequences)."""
        return self.layers[0].batch_size

    def select(self, rows: Tensor | Sequence[int]) -> LMState:
        """A state of the given rows (any order, repeats allowed): rows leave a batch, beams are reordered."""
        return LMState([s.select(rows) for s in self.layers])

    @classmethod
    def concat(cls, states: Sequence[LMState]) -> LMState:
        """One state holding the rows of every state in turn (rows may be at different positions)."""
        if not states or len({len(s) for s in states}) != 1:
            raise ValueError(f"concat needs states of one model, got {[len(s) for s in states]} layers")
        return cls([type(parts[0]).concat(parts) for parts in zip(*(s.layers for s in states), strict=True)])

    # In place, layer by layer: for a holder that owns this state alone (the serving engine's running batch).
    # Each layer's new state replaces its old one as soon as it is built, so the old and new copies of only one
    # layer exist at once, instead of two whole batch states. The mixer states themselves stay values.
    def extend_(self, other: LMState) -> None:
        """Append other's rows after this state's rows, in place (same result as concat([self, other]))."""
        if len(other) != len(self):
            raise ValueError(f"extend_ needs a state of the same model, got {len(other)} layers, not {len(self)}")
        for i, (mine, theirs) in enumerate(zip(self.layers, other.layers, strict=True)):
            self.layers[i] = type(mine).concat([mine, theirs])

    def select_(self, rows: Tensor | Sequence[int]) -> None:
        """Keep only these rows, in that order, in place (same result as select(rows))."""
        for i, s in enumerate(self.layers):
            self.layers[i] = s.select(rows)

    def to(self, device=None, dtype: torch.dtype | None = None) -> LMState:
        """This state on `device`, for activations of `dtype` (SSM states keep their compute precision)."""
        return LMState([s.to(device, dtype) for s in self.layers])

    def to_tensors(self) -> dict[str, Tensor]:
        """Named real tensors, "<layer>.<name>" (e.g. "3.shift"); `type_names` says how to read them back."""
        return {f"{i}.{name}": t for i, s in enumerate(self.layers) for name, t in s.to_tensors().items()}

    def type_names(self) -> list[str]:
        """The state class of every layer by its registered name (layers/state.py)."""
        return [type(s).__name__ for s in self.layers]

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], types: Sequence[type[MixerState] | str]) -> LMState:
        """The state `to_tensors` described; types: each layer's state class, or its name (`type_names`)."""
        grouped: list[dict[str, Tensor]] = [{} for _ in types]
        for key, tensor in tensors.items():
            layer, _, name = key.partition(".")
            if not layer.isdigit() or int(layer) >= len(types) or not name:
                raise ValueError(f"state tensor {key!r} names no layer 0 .. {len(types) - 1}")
            grouped[int(layer)][name] = tensor
        classes = [state_type(t) if isinstance(t, str) else t for t in types]
        return cls([c.from_tensors(named) for c, named in zip(classes, grouped, strict=True)])


@dataclass
class LMOutput:
    """What `H3LM.forward` returns."""

    logits: Tensor  # (B, L, padded vocab)
    loss: Tensor | None = None  # mean cross-entropy over labels != -100, when labels were given
    state: LMState | None = None  # every block's state after the sequence, when asked for


class MLP(nn.Module):
    """fc1 (D -> d_inner), GELU (tanh approximation), fc2 (d_inner -> D)."""

    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_inner)
        self.fc2 = nn.Linear(d_inner, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def step(self, x_t: Tensor) -> Tensor:
        """(B, D) -> (B, D), with decode-time matrix products."""
        return decode_linear(self.fc2, F.gelu(decode_linear(self.fc1, x_t), approximate="tanh"))


class Block(nn.Module):
    """x = x + mixer(LN1(x)); x = x + MLP(LN2(x))."""

    def __init__(self, config: H3Config, layer: int):
        super().__init__()
        c = config
        kind = c.mixer(layer)
        ssm = {"d_state": c.d_state, "ssm_init": c.ssm_init, "discretization": c.discretization,
               "dt_min": c.dt_min, "dt_max": c.dt_max, "mode": c.ssm_mode}  # fmt: skip
        if kind == "attention":
            self.mixer = MultiHeadAttention(c.d_model, c.n_head, c.rotary_dim)
        elif kind == "h3":
            self.mixer = H3(c.d_model, head_dim=c.head_dim, **ssm)
        else:
            self.mixer = S4D(c.d_model, **ssm)
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.mlp = MLP(c.d_model, c.mlp_width)
        self.dropout = nn.Dropout(c.resid_dropout)

    def forward(self, x: Tensor, state=None, return_state: bool = False, mask: Tensor | None = None):
        """x (B, L, D) -> (x, mixer state or None)."""
        h, state = self.mixer(self.norm1(x), state, return_state, mask=mask)
        x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.norm2(x))), state

    def step(self, x_t: Tensor, state, *, in_place: bool = False):
        """x_t (B, D) -> (x_t, new mixer state; updated in place when asked, see H3.step)."""
        h, state = self.mixer.step(self.norm1(x_t), state, in_place=in_place)
        x_t = x_t + h
        return x_t + self.mlp.step(self.norm2(x_t)), state


class Embeddings(nn.Module):
    """Word embedding only: H3 models have no position embedding."""

    def __init__(self, config: H3Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, D)."""
        return self.word_embeddings(input_ids)


class Backbone(nn.Module):
    """Embeddings, blocks and the final LayerNorm."""

    def __init__(self, config: H3Config):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.drop = nn.Dropout(config.embed_dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


class H3LM(nn.Module):
    """An H3 language model: pure H3, hybrid, Transformer or S4D, as its config says."""

    def __init__(self, config: H3Config):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embeddings.word_embeddings.weight  # tied
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear and Embedding weights N(0, 0.02), biases 0; attention out_proj and MLP fc2 weights
        N(0, 0.02 / sqrt(2 n_layer)); SSM parameters keep their own initialisation (docs/models.md)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.backbone.layers:
            nn.init.normal_(block.mlp.fc2.weight, std=std / math.sqrt(2 * self.config.n_layer))
            if isinstance(block.mixer, MultiHeadAttention):
                nn.init.normal_(block.mixer.out_proj.weight, std=std / math.sqrt(2 * self.config.n_layer))

    # ---- checks --------------------------------------------------------------------------------------
    def _check_ids(self, input_ids: Tensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        check_ids_in_range(input_ids, self.config.vocab_size, "token ids")

    @property
    def device(self) -> torch.device:
        """Where the weights are: the word embedding's device (an int8 LM head holds no float weight to ask)."""
        return self.backbone.embeddings.word_embeddings.weight.device

    # ---- state contract ----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> LMState:
        """Every block's empty state for a batch of batch_size rows."""
        device = device or self.device
        return LMState([block.mixer.init_state(batch_size, device, dtype) for block in self.backbone.layers])

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        state: LMState | None = None,
        return_state: bool = False,
    ) -> LMOutput:
        """input_ids (B, L) -> LMOutput(logits (B, L, padded vocab), loss, state).

        labels (B, L): next-token targets already aligned with the logits (-100 is ignored). attention_mask
        (B, L): 1 for real tokens, 0 for padding (left padding when states are kept).
        """
        h, new_state = self.hidden_states(input_ids, attention_mask, state, return_state)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            self._check_labels(labels, input_ids)
            loss = _cross_entropy(logits, labels)
        return LMOutput(logits, loss, new_state if return_state else None)

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        state: LMState | None = None,
        return_state: bool = False,
    ) -> tuple[Tensor, LMState | None]:
        """input_ids (B, L) -> (final-norm output (B, L, D) that the LM head reads, every block's state or None)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
        self._check_ids(input_ids)
        if state is not None and len(state) != self.config.n_layer:
            raise ValueError(f"state has {len(state)} entries for {self.config.n_layer} layers")
        x = self.backbone.drop(self.backbone.embeddings(input_ids))
        new_state = []
        # Activation checkpointing: keep only each block's input, recompute the block in backward.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and state is None
        for i, block in enumerate(self.backbone.layers):
            if recompute:
                x, s = checkpoint(block, x, None, return_state, mask=attention_mask, use_reentrant=False)
            else:
                x, s = block(x, state[i] if state is not None else None, return_state, mask=attention_mask)
            new_state.append(s)
        return self.backbone.ln_f(x), (LMState(new_state) if return_state else None)

    def logits_at(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """input_ids (B, L), positions (B, L) bool -> logits (N, padded vocab) at the N true positions.

        The head over a large vocabulary dominates a small model's cost; tasks graded at a few positions
        (synthetic recall, MQAR) need it only there.
        """
        if positions.shape != input_ids.shape or positions.dtype != torch.bool:
            raise ValueError(f"positions must be a bool tensor of shape {tuple(input_ids.shape)}")
        h, _ = self.hidden_states(input_ids)
        return self.lm_head(h[positions])

    def loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over labels != -100: `forward(input_ids, labels).loss`, with the head only there."""
        self._check_labels(labels, input_ids)
        h, _ = self.hidden_states(input_ids)
        if not values_known(labels):
            # Which positions are labelled is data that boolean indexing would read; without values (fake
            # tensors, torch.compile) the head runs everywhere and the loss ignores the -100 positions.
            return _cross_entropy(self.lm_head(h), labels)
        keep = labels != -100
        # The head and the loss together, a chunk of positions at a time: no (N, vocab) logits tensor.
        return linear_cross_entropy(h[keep], self.lm_head.weight, labels[keep])

    @staticmethod
    def _check_labels(labels: Tensor, input_ids: Tensor) -> None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")

    def step(self, input_ids: Tensor, state: LMState, *, in_place: bool = False) -> tuple[Tensor, LMState]:
        """One token per sequence; input_ids (B,) -> (logits (B, padded vocab), new state).

        in_place: advance `state` itself and return it, for a caller that owns the state alone (the serving
        engine): every SSM state is updated in its own tensors, and each block's state replaces the old one as
        soon as it is built, so a decode step allocates nothing the size of the state. Same logits and state.
        """
        if input_ids.dim() != 1:
            raise ValueError(f"step takes one token per sequence, shape (batch,), got {tuple(input_ids.shape)}")
        if len(state) != len(self.backbone.layers):
            raise ValueError(f"the state has {len(state)} layers, the model {len(self.backbone.layers)} blocks")
        self._check_ids(input_ids)
        x = self.backbone.embeddings(input_ids)
        new = state if in_place else LMState(list(state.layers))
        for i, block in enumerate(self.backbone.layers):
            x, new.layers[i] = block.step(x, new.layers[i], in_place=in_place)
        return decode_linear(self.lm_head, self.backbone.ln_f(x)), new

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors into directory (atomically)."""
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, source, device=None, dtype=None, **convert_options) -> H3LM:
        """Load from a save_pretrained directory, an official H3 .pt file or a Hub id; eval mode."""
        return load_pretrained(cls, source, device, dtype, **convert_options)

    def num_parameters(self) -> int:
        """Parameter count with the tied head counted once."""
        return sum(p.numel() for p in self.parameters())
