"""Language models: the config (config.py), the LM and its state (lm.py), checkpoint I/O (checkpoint.py) and the
official-checkpoint converter (official.py), int8 inference copies (quantize.py). Imports run one way:
lm -> checkpoint -> official -> config, and checkpoint -> quantize."""

from .config import PRESETS, H3Config
from .lm import H3LM, LMOutput, LMState

__all__ = ["PRESETS", "H3Config", "H3LM", "LMOutput", "LMState"]
