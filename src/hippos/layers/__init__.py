"""Sequence layers. Mixers (H3, S4D, attention) share one state contract:

    y, state = mixer(x, state=None, return_state=False)   # x (B, L, D), parallel over the sequence
    y_t, state = mixer.step(x_t, state)                    # x_t (B, D), one token
    state = mixer.init_state(batch_size, device, dtype)

The SSMs themselves (ShiftSSM, DiagonalSSM) work channel-first on (..., H, L) with the same three calls.
"""

from .attention import MultiHeadAttention
from .diagonal_ssm import DiagonalSSM
from .h3 import H3, H3State
from .s4d import S4D
from .shift_ssm import ShiftSSM

__all__ = ["H3", "S4D", "DiagonalSSM", "H3State", "MultiHeadAttention", "ShiftSSM"]
