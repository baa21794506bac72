"""hippos: H3 (Hungry Hungry Hippos) state space language models in PyTorch.

Public API: `hippos.layers` (H3, S4D, attention and the two SSMs) and `hippos.ops` (the tensor functions
beneath them). Importing hippos never imports an optional dependency.
"""

from . import layers, ops
from .layers import H3, S4D

__version__ = "0.1.0"
__all__ = ["H3", "S4D", "layers", "ops", "__version__"]
