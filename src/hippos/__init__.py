"""hippos: H3 (Hungry Hungry Hippos) state space language models in PyTorch.

Public API: `hippos.H3LM` and `hippos.H3Config` (language models), `hippos.generate` (decoding),
`hippos.quantize` (an int8 copy of a model for CPU inference),
`hippos.layers` (H3, S4D, attention and the two SSMs) and `hippos.ops` (the tensor functions beneath them).
Importing hippos never imports an optional dependency: `import hippos.models.hf` (which imports transformers)
is what teaches transformers' Auto classes the "h3" models.
"""

from . import layers, models, ops
from .generation import generate
from .layers import H3, S4D
from .models import H3LM, H3Config
from .models.lm import LMState
from .models.quantize import quantize

__version__ = "0.1.0"
__all__ = [
    "H3", "H3LM", "H3Config", "LMState", "S4D", "generate", "layers", "models", "ops", "quantize", "__version__"
]  # fmt: skip
