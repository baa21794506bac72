"""Generation: sampling, the decode loop, streaming, and saving the recurrent state."""

from .decode import Sampling, generate, stream
from .sampling import filter_logits, sample_next
from .state import load_state, read_state, save_state
from .streaming import TextStreamer

__all__ = [
    "Sampling",
    "TextStreamer",
    "filter_logits",
    "generate",
    "load_state",
    "read_state",
    "sample_next",
    "save_state",
    "stream",
]
