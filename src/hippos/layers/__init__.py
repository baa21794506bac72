"""Sequence layers. Mixers (H3, S4D, attention) share one state contract (docs/state.md):

    y, state = mixer(x, state=None, return_state=False)   # x (B, L, D), parallel over the sequence
    y_t, state = mixer.step(x_t, state, in_place=False)    # x_t (B, D), one token (in place: the owner's path)
    state = mixer.init_state(batch_size, device, dtype)

Each mixer's state is a small dataclass (H3State, S4DState, AttentionState) with one protocol (layers/state.py):
batch_size, select(rows), concat(states), to(device, dtype), to_tensors() and from_tensors(tensors).
The SSMs themselves (ShiftSSM, DiagonalSSM) work channel-first on (..., H, L) with the same three calls.
Int8Linear is the int8-weight linear layer of quantized models (docs/quantization.md).
"""

from .attention import AttentionState, MultiHeadAttention
from .diagonal_ssm import DiagonalSSM
from .h3 import H3, H3State
from .int8_linear import Int8Linear
from .s4d import S4D, S4DState
from .shift_ssm import ShiftSSM
from .state import STATE_TYPES, MixerState, SSMState, state_type

__all__ = [
    "H3",
    "S4D",
    "STATE_TYPES",
    "AttentionState",
    "DiagonalSSM",
    "H3State",
    "Int8Linear",
    "MixerState",
    "MultiHeadAttention",
    "S4DState",
    "SSMState",
    "ShiftSSM",
    "state_type",
]
