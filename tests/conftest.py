"""Shared fixtures: float64 S4D parameters, fast-vs-reference comparison with gradients, step loops."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from hippos.data.examples import EXAMPLES, example_path
from hippos.ops import discretize, ssm_A
from tolerances import assert_close

# The team's copies of the example texts, beside the checkout when there is one (no test requires them).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config) -> None:
    register_simulated_device()


def register_simulated_device(name: str = "fakegpu") -> None:
    """The accelerator tests/test_devices.py simulates: PyTorch's PrivateUse1 device renamed, with the no-op device
    guard PyTorch provides for Python backends, reporting itself unavailable so that nothing else picks it.

    Registered here, before any test runs: PyTorch's autograd engine sizes its per-device queues at its first
    backward pass, and a device registered after that fails there. Once registered it stays for the process.
    """
    try:
        from torch.utils.backend_registration import (
            _DummyBackendModule,
            _DummyPrivateUse1Hook,
            _setup_privateuseone_for_python_backend,
        )
    except ImportError:  # an older PyTorch: test_devices.py skips its simulated runs
        return
    if torch._C._get_privateuse1_backend_name() != "privateuseone":
        return  # taken by someone else: test_devices.py skips

    class Unavailable(_DummyBackendModule):  # fake tensors then never run real kernels on it
        def is_available(self) -> bool:
            return False

        def get_amp_supported_dtype(self) -> list[torch.dtype]:  # for autocast (and activation checkpointing)
            return [torch.float16, torch.bfloat16]

    class UnavailableHooks(_DummyPrivateUse1Hook):  # torch.accelerator.is_available() stays False
        def is_available(self) -> bool:
            return False

    _setup_privateuseone_for_python_backend(name, backend_module=Unavailable(), hook=UnavailableHooks())


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Tokenized text and example files go to a temporary folder, never ~/.cache/hippos (workers inherit it).

    Example files found in SHARED_DATA are put there first, so nothing that uses them downloads them.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HIPPOS_CACHE", str(tmp_path_factory.mktemp("hippos-cache")))
        for name, entry in EXAMPLES.items():
            if (SHARED_DATA / entry.filename).is_file():
                example_path(name).parent.mkdir(exist_ok=True)
                shutil.copyfile(SHARED_DATA / entry.filename, example_path(name))
        yield


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch RNG state, so failures reproduce."""
    torch.manual_seed(0)


@dataclass
class S4DParams:
    """Leaf tensors of a diagonal SSM in the layers' layout: complex B and C stored as (H, M, 2) reals."""

    log_dt: Tensor  # (H,)
    inv_A_real: Tensor  # (H, M)
    A_imag: Tensor  # (H, M)
    B: Tensor  # (H, M, 2)
    C: Tensor  # (H, M, 2)

    def leaves(self) -> list[Tensor]:
        return [self.log_dt, self.inv_A_real, self.A_imag, self.B, self.C]

    def discrete(self, method: str = "bilinear") -> tuple[Tensor, Tensor, Tensor]:
        """(dA, dB, C) complex128, built through `ssm_A` and `discretize` so gradients reach the leaves."""
        A = ssm_A(self.inv_A_real, self.A_imag)
        dA, dB = discretize(self.log_dt, A, torch.view_as_complex(self.B), method)
        return dA, dB, torch.view_as_complex(self.C)


def _make_s4d_params(H: int, M: int, seed: int = 0, requires_grad: bool = True) -> S4DParams:
    """Random float64 S4D parameters near the S4D-Lin initialisation, with dt large enough to decay."""
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    log_dt = math.log(1e-2) + torch.rand(H, generator=g, **f64) * (math.log(0.5) - math.log(1e-2))
    inv_A_real = math.log(0.5) + 0.5 * torch.randn(H, M, generator=g, **f64)
    A_imag = math.pi * torch.arange(M, **f64) + 0.3 * torch.randn(H, M, generator=g, **f64)
    B = torch.randn(H, M, 2, generator=g, **f64)
    C = torch.randn(H, M, 2, generator=g, **f64) / math.sqrt(2)
    params = S4DParams(log_dt, inv_A_real, A_imag, B, C)
    for t in params.leaves():
        t.requires_grad_(requires_grad)
    return params


@pytest.fixture(scope="session")
def s4d_params() -> Callable[..., S4DParams]:
    """Factory: s4d_params(H, M, seed=0, requires_grad=True) -> S4DParams in float64."""
    return _make_s4d_params


def _as_tuple(x) -> tuple[Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _grads(outputs: Sequence[Tensor], inputs: Sequence[Tensor], seed: int) -> tuple[Tensor, ...]:
    """Gradients of sum_i <w_i, outputs_i> for fixed random weights w_i (complex outputs as re/im pairs)."""
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    for out in outputs:
        real = torch.view_as_real(out) if out.is_complex() else out
        w = torch.randn(real.shape, generator=g, dtype=torch.float64).to(real.dtype)
        loss = loss + (real * w).sum()
    return torch.autograd.grad(loss, list(inputs))


def _compare(
    fast: Callable[[], Tensor | tuple[Tensor, ...]],
    ref: Callable[[], Tensor | tuple[Tensor, ...]],
    inputs: Sequence[Tensor],
    scale: float = 1.0,
    seed: int = 1,
) -> None:
    """Assert that fast() and ref() return equal outputs and equal gradients wrt every tensor in inputs.

    Each callable builds its whole graph from the leaves in `inputs`. Every reference gradient must be
    nonzero somewhere, so an input that silently does not take part fails instead of comparing 0 to 0.
    Tolerances come from tests/tolerances.py by dtype (`scale` widens them, as in `assert_close`).
    """
    out_fast, out_ref = _as_tuple(fast()), _as_tuple(ref())
    assert len(out_fast) == len(out_ref)
    for i, (a, b) in enumerate(zip(out_fast, out_ref, strict=True)):
        assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert_close(a, b, scale=scale, msg=f"output {i}")
    g_fast = _grads(out_fast, inputs, seed)
    g_ref = _grads(out_ref, inputs, seed)
    for i, (a, b) in enumerate(zip(g_fast, g_ref, strict=True)):
        assert b.abs().max() > 0, f"input {i} does not influence the reference output"
        assert_close(a, b, scale=scale, msg=f"gradient wrt input {i}")


@pytest.fixture(scope="session")
def compare_with_grads():
    """compare_with_grads(fast, ref, inputs, scale=1.0): outputs and all gradients equal (tests/tolerances.py)."""
    return _compare


@pytest.fixture(scope="session")
def grads_of():
    """grads_of(outputs, inputs, seed=1): gradients of a fixed random projection of the outputs."""
    return lambda outputs, inputs, seed=1: _grads(_as_tuple(outputs), inputs, seed)


def _run_steps(layer, x: Tensor, state, dim: int):
    """Feed x one position at a time along `dim` through layer.step (or a step function itself).

    Returns (stacked outputs, final state).
    """
    step = layer.step if hasattr(layer, "step") else layer
    ys = []
    for t in range(x.shape[dim]):
        y_t, state = step(x.select(dim, t), state)
        ys.append(y_t)
    return torch.stack(ys, dim=dim), state


@pytest.fixture(scope="session")
def run_steps():
    """run_steps(layer_or_step_fn, x, state, dim=1): the recurrent path over a whole sequence."""
    return lambda layer, x, state, dim=1: _run_steps(layer, x, state, dim)
