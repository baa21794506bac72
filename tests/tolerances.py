"""The one closeness check of the test suite, with its tolerance table by dtype.

Every test that compares floating-point results calls `assert_close` (imported as `from tolerances import
assert_close`; tests/ is on the import path through its conftest). The table says how far two correct computations
of the same math may drift apart in a dtype: different summation orders, an FFT against a direct sum, a chunked
scan against one pass. `strict=True` takes the tighter row, for identities (the same formula rearranged, an op
against its own definition). `scale` widens a tolerance for a computation that is known to accumulate more
(a whole model, a long recurrence); each use says why. Bit-identical results use `torch.equal`, not this.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (rtol, atol), looked up by the dtype of the expected value (complex dtypes by their real part).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}
STRICT = {
    torch.float64: (1e-13, 1e-14),
    torch.float32: (1e-6, 1e-7),
    torch.bfloat16: (8e-3, 8e-3),
    torch.float16: (1e-3, 1e-3),
}


def tolerance(dtype: torch.dtype, strict: bool = False, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for results of this dtype."""
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    rtol, atol = (STRICT if strict else TOLERANCES)[real]
    return rtol * scale, atol * scale


def assert_close(
    actual: Tensor, expected: Tensor, *, strict: bool = False, scale: float = 1.0, msg: str | None = None
) -> None:
    """Assert actual == expected within the table's tolerance for expected's dtype (shapes and dtypes must match)."""
    rtol, atol = tolerance(expected.dtype, strict, scale)
    note = (lambda m: f"{msg}: {m}") if msg else None
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=note)
