"""Registering H3 models with transformers' Auto classes, without importing transformers ourselves.

`import hippos` must not import an optional dependency (DESIGN.md), and transformers takes seconds to import;
yet after `import hippos`, AutoModelForCausalLM.from_pretrained should load "h3" models, whichever of the two
was imported first. So `import hippos` calls `register_on_import()`:

- transformers already imported: register now;
- otherwise: put a one-shot finder first on sys.meta_path. When `transformers` is first imported, it asks the
  other finders for the real module spec, and wraps that spec's loader so that registration runs as soon as
  the transformers package has executed. Nothing else about the import changes, and a failing registration
  only warns: it never breaks `import transformers`.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_registered = False


def register() -> bool:
    """Register H3HFConfig and H3ForCausalLM with AutoConfig and AutoModelForCausalLM (idempotent).

    Returns False, registering nothing, when transformers is not installed.
    """
    global _registered
    if _registered:
        return True
    hf = sys.modules.get(f"{__package__}.hf")
    if hf is not None and not hasattr(hf, "H3ForCausalLM"):
        return False  # hf.py is being imported (its `import transformers` led here); it calls us at its end
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return False
    from .config import MODEL_TYPE
    from .hf import H3ForCausalLM, H3HFConfig

    AutoConfig.register(MODEL_TYPE, H3HFConfig, exist_ok=True)
    AutoModelForCausalLM.register(H3HFConfig, H3ForCausalLM, exist_ok=True)
    _registered = True
    return True


def _register_or_warn() -> None:
    try:
        register()
    except Exception as err:  # never let our registration break someone's import of transformers
        warnings.warn(
            f"hippos could not register its H3 models with transformers' Auto classes ({type(err).__name__}: "
            f"{err}); use hippos.models.hf.H3ForCausalLM directly",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lends the `transformers` spec of the other finders a loader that registers after."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        else:
            return None  # not installed: the import fails as it would without us
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module, patched = loader.exec_module, vars(loader).get("exec_module")

        def exec_module_then_register(module):
            try:
                exec_module(module)  # transformers' own import; its errors propagate unchanged
            finally:  # give the loader its exec_module back
                if patched is None:
                    del loader.exec_module
                else:
                    loader.exec_module = patched
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_or_warn()

        loader.exec_module = exec_module_then_register  # this loader object serves this one module only
        return spec


def register_on_import() -> None:
    """Register now if transformers is imported, else as soon as it is (see the module docstring)."""
    if "transformers" in sys.modules:
        _register_or_warn()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
