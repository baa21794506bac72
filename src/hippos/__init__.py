"""hippos: H3 (Hungry Hungry Hippos) state space language models in PyTorch.

Public API: `hippos.H3LM` and `hippos.H3Config` (language models), `hippos.layers` (H3, S4D, attention and
the two SSMs) and `hippos.ops` (the tensor functions beneath them). Importing hippos never imports an
optional dependency.
"""

from . import layers, models, ops
from .layers import H3, S4D
from .models import H3LM, H3Config
from .models import hf_registration as _hf_registration

# transformers' Auto classes learn the "h3" models once transformers is imported (this never imports it).
_hf_registration.register_on_import()

__version__ = "0.1.0"
__all__ = ["H3", "H3LM", "H3Config", "S4D", "layers", "models", "ops", "__version__"]
