"""Hugging Face transformers interface: H3HFConfig, H3ForCausalLM and H3Cache (transformers >= 5).

    import hippos.models.hf                                   # imports transformers, registers "h3" with it
    model = AutoModelForCausalLM.from_pretrained(directory)   # a save_pretrained directory of either library
    out = model.generate(input_ids, max_new_tokens=20, do_sample=False)

Importing this module registers H3HFConfig and H3ForCausalLM with transformers' AutoConfig and
AutoModelForCausalLM (model_type "h3"): that import is what makes the Auto classes know H3 models. `import hippos`
alone never imports transformers, and nothing of transformers is patched.

H3ForCausalLM holds the `backbone` and `lm_head` of an H3LM, so its state-dict keys are H3LM's and directories
written by either library's save_pretrained load in the other. The forward pass is H3LM's own.

Generation: the cache is the model's recurrent state itself, an LMState, wrapped in an H3Cache; it is used only
through the state protocol (docs/state.md). generate() runs the prompt in parallel (H3LM.forward with
return_state=True, left padding through attention_mask) and then one token per step through H3LM.step. An
H3Cache is a value: a forward pass returns a new one and never changes the one it was given, so a cache kept
after a prompt can seed several continuations.

Logits cover the config's vocab_size ids, as transformers expects (generate() and beam search size their
buffers by it): H3LM's embedding is padded to a multiple of 8, and the padding ids, which are no tokens, are
left out (a view, no copy), so generate() never emits one.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import H3, S4D, DiagonalSSM, MultiHeadAttention, ShiftSSM
from ..ops.checks import values_known
from .config import MODEL_TYPE, H3Config
from .lm import H3LM, LMState

try:  # transformers 5: dataclass configs, dict-style tied weights, transformers.initialization
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers import initialization as init
    from transformers.initialization import no_init_weights
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as err:
    raise ImportError(
        f"hippos' Hugging Face interface needs transformers >= 5 ({err}): pip install 'transformers>=5'"
    ) from err


# transformers 5.24 renamed the outputs' (and generate()'s) past_key_values to cache; use the name it has.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


# H3Config's fields with their types and defaults, read from H3Config (not re-declared). transformers makes every
# config class a dataclass, and a dataclass takes the fields of its dataclass bases: H3HFConfig inherits these.
_H3_TYPES = typing.get_type_hints(H3Config)
_H3Fields = dataclasses.make_dataclass(
    "_H3Fields",
    [(f.name, _H3_TYPES[f.name], dataclasses.field(default=f.default)) for f in dataclasses.fields(H3Config)],
)


class H3HFConfig(PreTrainedConfig, _H3Fields):
    """transformers' view of an H3Config: H3Config's fields with the same defaults, under model_type "h3"."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
    # The LM head is always the word embedding (no field: an H3 model cannot be untied). transformers reads
    # this to tie the weights and to store the shared tensor once.
    tie_word_embeddings: ClassVar[bool] = True

    def __post_init__(self, **kwargs):
        if kwargs.get("quantization") is not None:  # written by save_pretrained of a hippos.quantize model
            raise ValueError(
                f"this folder holds a {kwargs['quantization']} model, whose layers transformers cannot build: "
                "load it with hippos.H3LM.from_pretrained (docs/quantization.md)"
            )
        super().__post_init__(**kwargs)
        self.attn_layer_idx = tuple(int(i) for i in self.attn_layer_idx)  # JSON gives a list
        if not self.tie_word_embeddings:
            raise ValueError("H3 models always tie the LM head to the word embedding; tie_word_embeddings must be true")
        self.to_h3_config()  # validates every field now, with H3Config's error messages

    @classmethod
    def from_h3_config(cls, config: H3Config, **kwargs) -> H3HFConfig:
        """The same configuration for transformers (kwargs: transformers' own options, e.g. eos_token_id)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(H3Config)}, **kwargs)

    def to_h3_config(self) -> H3Config:
        """hippos' H3Config, from H3Config's fields only (transformers' own keys stay here)."""
        return H3Config.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(H3Config)})


@dataclasses.dataclass
class H3Cache:
    """generate()'s cache: the model's LMState, and how many positions it has seen.

    Not a transformers Cache (whose layers hold growing key/value tensors): H3 and S4D states have a fixed size
    and cannot be rolled back, so generate() treats the model as stateful (no assisted decoding) and never
    compiles its decode step. Beam search picks rows with `select`, through H3ForCausalLM._reorder_cache.
    """

    state: LMState  # every block's state
    seq_length: int  # positions seen, left padding included (what transformers counts)
    is_compileable: ClassVar[bool] = False
    is_croppable: ClassVar[bool] = False

    @property
    def is_linear(self) -> list[bool]:
        """False for every block: transformers (>= 5.24) then cuts a continued prompt to the tokens this cache has
        not seen, which is right here because the cache counts them (it leaves whole prompts to linear-attention
        caches that do not)."""
        return [False] * len(self.state)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen so far (generate() slices the prompt of a continued generation with it)."""
        return self.seq_length

    def __len__(self) -> int:
        return len(self.state)

    def select(self, rows: Tensor) -> H3Cache:
        """A cache of the batch rows `rows` (beam search); this one is left as it is."""
        return H3Cache(self.state.select(rows), self.seq_length)


class H3ForCausalLM(PreTrainedModel, GenerationMixin):
    """An H3LM (pure H3, hybrid, Transformer or S4D) as a transformers causal LM; see the module docstring."""

    config: H3HFConfig
    config_class = H3HFConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.word_embeddings.weight"}
    _is_stateful = True  # recurrent states cannot be cropped: no assisted decoding

    def __init__(self, config: H3HFConfig, hippos_model: H3LM | None = None):
        super().__init__(config)
        if hippos_model is not None and hippos_model.config != config.to_h3_config():
            raise ValueError("hippos_model's config differs from config; use H3ForCausalLM.from_hippos(model)")
        lm = hippos_model if hippos_model is not None else H3LM(config.to_h3_config())
        self.backbone = lm.backbone
        self.lm_head = lm.lm_head
        # The H3LM whose forward and step run this model: it shares our modules but is not a submodule of
        # ours, so that the state dict keeps H3LM's key names (and has no second copy of them).
        self.__dict__["_hippos_model"] = lm
        self.post_init()

    # ---- converting ----------------------------------------------------------------------------------------
    @classmethod
    def from_hippos(cls, model: H3LM, **config_kwargs) -> H3ForCausalLM:
        """Wrap a native model; the two share modules and weights (no copy)."""
        with no_init_weights():  # keep the model's weights
            return cls(H3HFConfig.from_h3_config(model.config, **config_kwargs), hippos_model=model)

    def to_hippos(self) -> H3LM:
        """The native H3LM running this model; it shares modules and weights with it (copy.deepcopy for a copy)."""
        lm = self.__dict__["_hippos_model"]
        if lm.backbone is not self.backbone:  # a module was replaced (e.g. set_input_embeddings)
            lm.backbone = self.backbone
        if lm.lm_head is not self.lm_head:
            lm.lm_head = self.lm_head
        return lm

    # ---- transformers' hooks -------------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not create a DynamicCache: the model returns its own H3Cache

    def _reorder_cache(self, cache: H3Cache, beam_idx: Tensor) -> H3Cache:
        return cache.select(beam_idx)  # beam search; caches stay values

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """H3LM's initialisation, module by module, through transformers' init functions (which skip loaded
        tensors): from_pretrained builds the model on the meta device and initialises only what it did not load."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if module in self._residual_projections():
                std /= (2 * self.config.n_layer) ** 0.5
            init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ShiftSSM):
            fresh = ShiftSSM(module.channels, module.d_state, device="cpu")
            _copy_parameters(module, fresh)
        elif isinstance(module, DiagonalSSM):
            m = module
            fresh = DiagonalSSM(m.channels, m.d_state, m.init, m.discretization, m.dt_min, m.dt_max, device="cpu")
            _copy_parameters(module, fresh)
        elif isinstance(module, H3):
            init.normal_(module.ssm_k_D)
            init.normal_(module.D)
        elif isinstance(module, S4D):
            init.normal_(module.D)

    def _residual_projections(self) -> list[nn.Linear]:
        """The layers H3LM initialises with std / sqrt(2 n_layer): MLP fc2 and attention out_proj.

        (Set per Linear: transformers skips initialising modules without parameters of their own, like Block.)
        """
        blocks = self.backbone.layers
        return [b.mlp.fc2 for b in blocks] + [
            b.mixer.out_proj for b in blocks if isinstance(b.mixer, MultiHeadAttention)
        ]

    # ---- forward and generation ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: H3Cache | None = None,
        past_key_values: H3Cache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, L) -> CausalLMOutputWithPast(loss, logits (B, L, vocab_size), cache).

        labels (B, L) follow transformers' convention: shifted here, so position t is scored on labels[t + 1];
        -100 is ignored. attention_mask (B, L) or (B, past + L): 1 for tokens, 0 for padding, which may only be
        left padding at the start of the sequence (or right padding without a cache: the model is causal, so
        it cannot change the real positions). cache: an H3Cache from an earlier call (`past_key_values` is its
        name before transformers 5.24; either is taken, not both). use_cache: return an H3Cache (default: only
        when one was given). num_items_in_batch: the Trainer's token count for gradient accumulation
        (loss = sum / count). Any other argument is refused: ignoring one would silently change the result.
        """
        past_key_values = _one_cache(cache, past_key_values)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids (batch, length) are required")
        _refuse_unsupported(kwargs, past_key_values.seq_length if past_key_values is not None else 0, input_ids)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        use_cache = past_key_values is not None if use_cache is None else use_cache
        state = past_key_values.state if past_key_values is not None else None
        past = past_key_values.seq_length if past_key_values is not None else 0
        length = input_ids.shape[1]
        mask = self._mask_for_native(attention_mask, length, state is not None, use_cache)

        logits, new_state, loss = self._native(input_ids, labels, mask, state, use_cache, num_items_in_batch)
        logits = logits[..., : self.config.vocab_size]  # a view: the padding ids are no tokens
        cache = H3Cache(new_state, past + length) if use_cache else None
        if not return_dict:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _native(self, input_ids, labels, mask, state, use_cache, num_items_in_batch) -> tuple:
        """(logits (B, L, padded vocab), new LMState or None, loss or None) from H3LM: a step, or a parallel pass."""
        lm = self.to_hippos()
        if state is not None and input_ids.shape[1] == 1 and labels is None and not self.training:
            logits, new_state = lm.step(input_ids[:, 0], state)  # the decode path
            return logits[:, None], new_state, None
        targets = None
        if labels is not None:  # transformers' labels are the tokens themselves: H3LM's are shifted by one
            targets = F.pad(labels[:, 1:].to(input_ids.device), (0, 1), value=-100)
        out = lm(input_ids, labels=targets, attention_mask=mask, state=state, return_state=use_cache)
        loss = out.loss
        if loss is not None and num_items_in_batch is not None:
            loss = loss * (targets != -100).sum() / num_items_in_batch
        return out.logits, out.state, loss

    @staticmethod
    def _mask_for_native(mask: Tensor | None, length: int, has_state: bool, use_cache: bool) -> Tensor | None:
        """The attention mask H3LM should see for `length` new tokens (None where it changes nothing)."""
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[1] < length:
            raise ValueError(f"attention_mask must be (batch, >= {length}), got {tuple(mask.shape)}")
        mask = mask[:, -length:].bool()  # generate() passes the mask of the whole sequence so far
        if not values_known(mask):
            # Fake tensors or compiling: the mask cannot be read. After a state it may only be ones (the state
            # knows the prompt's padding); a fresh sequence goes to H3LM, whose checks skip unknown values too.
            return None if has_state else mask
        if bool(mask.all()):
            return None
        if has_state:  # the state already knows the padding of the prompt
            raise ValueError("padding is only allowed at the start of a sequence (left padding of the prompt)")
        ones_then_zeros = torch.equal(mask, mask.int().cummin(dim=1).values.bool())
        if ones_then_zeros and not use_cache:
            return None  # causal model: tokens after the real ones change nothing before them
        return mask  # H3LM checks that it is left padding


def _one_cache(cache: H3Cache | None, past_key_values: H3Cache | None) -> H3Cache | None:
    """The cache given under either name (transformers 5.24 renamed past_key_values to cache)."""
    if cache is not None and past_key_values is not None:
        raise TypeError("give the cache as `cache` or as `past_key_values`, not both")
    given = cache if cache is not None else past_key_values
    if given is not None and not isinstance(given, H3Cache):
        raise TypeError(f"the cache must be an H3Cache from this model, got {type(given).__name__}")
    return given


def _refuse_unsupported(kwargs: dict, past: int, input_ids: Tensor) -> None:
    """Raise for any forward() argument H3ForCausalLM does not act on, unless it asks for nothing.

    transformers passes some of them with empty values (inputs_embeds=None; before 5.24 also cache_position,
    the new tokens' positions, which the cache already counts); anything that would change the result if
    honoured is refused rather than ignored.
    """
    kwargs = dict(kwargs)
    positions = kwargs.pop("cache_position", None)
    if positions is not None:
        expected = torch.arange(past, past + input_ids.shape[1], device=positions.device)
        if positions.shape != expected.shape or (values_known(positions) and not torch.equal(positions, expected)):
            raise ValueError(f"cache_position must be the positions {past} .. {past + input_ids.shape[1] - 1} "
                             "of the new tokens after the cache")  # fmt: skip
    refused = {
        "inputs_embeds": "H3ForCausalLM takes input_ids, not inputs_embeds",
        "position_ids": "H3 models take positions from the cache and the attention mask, not position_ids",
        "output_attentions": "H3ForCausalLM returns no attentions",
        "output_hidden_states": "H3ForCausalLM returns no hidden states",
    }
    for name, value in kwargs.items():
        if name not in refused:
            raise TypeError(f"H3ForCausalLM.forward() got an argument it does not understand: {name}")
        if value is not None and value is not False:
            raise NotImplementedError(refused[name])


def _copy_parameters(module: nn.Module, fresh: nn.Module) -> None:
    """Copy freshly initialised parameters into module's own parameters, skipping those already loaded."""
    for (name, param), (fresh_name, value) in zip(
        module.named_parameters(recurse=False), fresh.named_parameters(recurse=False), strict=True
    ):
        assert name == fresh_name
        init.copy_(param, value)


# The Auto classes learn the "h3" models when this module is imported (exist_ok: importing it again is harmless).
AutoConfig.register(MODEL_TYPE, H3HFConfig, exist_ok=True)
AutoModelForCausalLM.register(H3HFConfig, H3ForCausalLM, exist_ok=True)
