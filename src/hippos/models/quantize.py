"""`hippos.quantize(model, "int8")`: an inference copy of an H3 language model with int8 linear layers.

Every nn.Linear of the model becomes an Int8Linear (symmetric per-output-channel int8 weights, layers/int8_linear.py):
the blocks' projections (H3 q/k/v/output, attention Wqkv/out_proj, S4D output) and MLPs, and the LM head. The head
is tied to the embedding in the float model; the copy gets its own int8 matrix while the embedding lookup keeps the
float one. SSM parameters, norms and the embedding stay float: they are a small share of the bytes a decode step
reads, and the recurrence compounds any error in them over the whole sequence (docs/quantization.md).

This module does not import the model class, not even for annotations (checkpoint.py, which lm.py imports, uses
it to load quantized directories): it checks the model by its parts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from ..layers.int8_linear import Int8Linear

METHODS = ("int8",)  # what quantize() offers
NONE = "none"  # a float model's quantization


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """A quantized copy of an H3LM for inference (eval mode, no gradients); model itself is left as it was."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of: {', '.join(METHODS)}")
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise TypeError(f"quantize takes an H3LM (a model with an lm_head), got {type(model).__name__}")
    done = quantization_of(model)
    if done != NONE:
        raise ValueError(f"the model is already quantized ({done}); quantize its float model instead")
    # The copy shares nothing with model. Block linears are not copied at all (they are replaced next); the head's
    # weight is the embedding, which the copy needs as a float tensor of its own.
    head = model.lm_head.weight
    memo = {id(t): t for m in model.modules() if isinstance(m, nn.Linear) for t in m.parameters() if t is not head}
    quantized = copy.deepcopy(model, memo)
    _replace_linears(quantized, Int8Linear.from_linear)
    quantized.requires_grad_(False)  # Int8Linear has no gradients: nothing upstream of it should ask for any
    return quantized.eval()


def quantization_of(model: nn.Module) -> str:
    """ "int8" when the model's linear layers hold int8 weights, "none" for a float model."""
    return METHODS[0] if any(isinstance(m, Int8Linear) for m in model.modules()) else NONE


def int8_layout(model: nn.Module, method: str) -> nn.Module:
    """model with every nn.Linear replaced, in place, by an empty Int8Linear of its shape: what a saved quantized
    model's tensors load into (models/checkpoint.py)."""
    if method not in METHODS:
        raise ValueError(
            f"unknown quantization {method!r} in the saved config; this hippos knows: {', '.join(METHODS)}"
        )

    def empty(linear: nn.Linear) -> Int8Linear:
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)

    _replace_linears(model, empty)
    return model.requires_grad_(False)


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Swap every nn.Linear inside model (at any depth) for make(linear)."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]  # fmt: skip
    for parent, name, child in found:
        setattr(parent, name, make(child))
