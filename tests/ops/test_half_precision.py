"""Half-precision inputs: output in the input dtype, error within about twice the plain path's.

The yardstick (DESIGN.md, Numerics): against the float64 reference, the fast path may be at most about
twice as wrong as the plain reference computed in the same low precision.
"""

from __future__ import annotations

import math

import pytest
import torch

from hippos.ops import (
    causal_conv_ref,
    diag_kernel_ref,
    diag_ssm_chunked,
    diag_ssm_fft,
    diag_ssm_ref,
    fft_conv,
    short_conv,
)
from tolerances import assert_close, tolerance

F64 = torch.float64
LOW = [torch.float16, torch.bfloat16]
H, L = 8, 200


def _rel_err(y: torch.Tensor, y64: torch.Tensor) -> float:
    return ((y.to(F64) - y64).norm() / y64.norm()).item()


def _assert_within_twice(fast, plain, y64, dtype):
    assert fast.dtype == dtype and fast.shape == y64.shape
    assert torch.isfinite(fast).all()
    err_fast, err_plain = _rel_err(fast, y64), _rel_err(plain, y64)
    slack = 0.05 * torch.finfo(dtype).eps  # a small absolute allowance for ties at the rounding level
    assert err_fast <= 2.0 * err_plain + slack, f"fast {err_fast:.3e} vs plain {err_plain:.3e}"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(("op", "Lk"), [(fft_conv, L), (fft_conv, 37), (lambda u, k, D: short_conv(u, k, D)[0], 16)])
def test_conv_half_precision(op, Lk, dtype):
    u = torch.randn(2, H, L, dtype=F64)
    k = torch.randn(H, Lk, dtype=F64) / math.sqrt(Lk)
    D = torch.randn(H, dtype=F64)
    y64 = causal_conv_ref(u, k, D)
    lo = [t.to(dtype) for t in (u, k, D)]
    _assert_within_twice(op(*lo), causal_conv_ref(*lo), y64, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(("op", "chunk"), [(diag_ssm_chunked, 16), (diag_ssm_chunked, 64), (diag_ssm_fft, 64)])
def test_diag_ssm_half_precision(dtype, op, chunk, s4d_params):
    p = s4d_params(H, 4, requires_grad=False)
    dA, dB, C = p.discrete()
    u = torch.randn(2, H, L, dtype=F64)
    D = torch.randn(H, dtype=F64)
    y64, h64 = diag_ssm_ref(u, dA, dB, C, D, output_final_state=True)
    # The plain path in low precision: the recurrence cannot run in complex half on the CPU, so take the
    # direct convolution with its (float64-exact) kernel, everything cast to the low dtype.
    K = diag_kernel_ref(dA, dB, C, L)
    plain = causal_conv_ref(u.to(dtype), K.to(dtype), D.to(dtype))
    c64 = [t.to(torch.complex64) for t in (dA, dB, C)]
    fast, state = op(u.to(dtype), *c64, D=D.to(dtype), output_final_state=True, chunk=chunk)
    _assert_within_twice(fast, plain, y64, dtype)
    assert state.dtype == torch.complex64  # SSM state in fp32 whatever the activation dtype
    # The state comes from inputs rounded to the low dtype: it is held to that dtype's relative tolerance (the
    # complex64 row scaled up to it), not to complex64's own.
    assert_close(state, h64.to(torch.complex64), scale=tolerance(dtype)[0] / tolerance(torch.float32)[0])
