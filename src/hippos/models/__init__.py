"""Language models: the config, the LM, checkpoint I/O and the official-checkpoint converter."""

from .config import PRESETS, H3Config
from .lm import H3LM, LMOutput

__all__ = ["PRESETS", "H3Config", "H3LM", "LMOutput"]
