"""The environment the Makefile builds holds every extra, importable: a test that skips for want of one would
otherwise hide an incompatible release (as datasets 2.15 with huggingface_hub 1.x once did)."""

import importlib
import os

import pytest

# What each extra of pyproject.toml brings, as the code imports it.
EXTRAS = {
    "hf": ["transformers", "tokenizers", "huggingface_hub"],
    "plot": ["matplotlib.pyplot"],
    "data": ["datasets"],
    "eval": ["lm_eval", "lm_eval.models.huggingface", "accelerate"],
    "serve": ["fastapi", "uvicorn", "prometheus_client"],
    "dev": ["pytest", "hypothesis", "openai"],
}


@pytest.mark.skipif(not os.environ.get("HIPPOS_ALL_EXTRAS"), reason="set by the Makefile, whose environments hold them")
@pytest.mark.parametrize("extra", EXTRAS)
def test_every_extra_imports(extra):
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except Exception as err:  # ImportError, or a release that breaks while importing another
            pytest.fail(f"extra {extra!r}: import {module} failed: {type(err).__name__}: {err}")
