"""Pure tensor functions behind the layers: SSM kernels, convolutions, recurrences, state passing.

One contract for every state space model op (docs/math.md, "Three exact ways to run an SSM over a
sequence"), whatever the way it runs:

    y, final_state = op(u, <params...>, D=None, initial_state=None, output_final_state=False, *, <knobs>)
    y_t, state = op_step(u_t, state, <params...>, D=None, *, <precomputed>)

- u is (..., H, L), channels before time, any leading batch shape; u_t is (..., H); y has u's shape and dtype.
- D (H,) is the optional skip, y += D u.
- initial_state is the state before u (zeros when None); final_state, the state after u, is None unless
  output_final_state, and is not computed then. States stay in the compute dtype (float32 / complex64, or
  float64 / complex128 for float64 inputs) whatever the input dtype.
- Tuning knobs (chunk sizes) and constants precomputed for many decode steps come last, keyword-only.
- Every fast op has a readable reference of the same signature, `<op>_ref`, and the tests hold them equal
  in outputs, final states and every gradient.

The ops of the contract:

- shift SSM, state the window of the last W inputs (..., H, W):
  `short_conv_ref` / `short_conv`; steps `short_conv_step_ref` / `short_conv_step`.
- diagonal SSM, state (..., H, M) complex:
  `diag_ssm_ref` / `diag_ssm_fft`, `diag_ssm_chunked`; steps `diag_ssm_step_ref` / `diag_ssm_step`.

Plain convolutions with a given kernel (`causal_conv_ref`, `fft_conv`, `causal_conv`) are not SSMs: they
have no state, and keep the form `y = op(u, k, D=None)`. Kernels (`shift_kernel`, `diag_kernel`) map
parameters to a filter, each beside its `_ref`; `linear_cross_entropy` beside `linear_cross_entropy_ref`.
"""

from .conv import (
    causal_conv,
    causal_conv_ref,
    compute_dtype,
    fft_conv,
    next_fast_len,
    short_conv,
    short_conv_ref,
    short_conv_step,
    short_conv_step_ref,
)
from .diagonal import (
    diag_kernel,
    diag_kernel_ref,
    diag_ssm_ref,
    diag_ssm_step,
    diag_ssm_step_ref,
    discretize,
    ssm_A,
    step_output_weights,
)
from .loss import linear_cross_entropy, linear_cross_entropy_ref
from .shift import shift_kernel, shift_kernel_ref, shift_step_ref
from .state_passing import chunk_operators, diag_ssm_chunked, diag_ssm_fft

__all__ = [
    "causal_conv",
    "causal_conv_ref",
    "chunk_operators",
    "compute_dtype",
    "diag_kernel",
    "diag_kernel_ref",
    "diag_ssm_chunked",
    "diag_ssm_fft",
    "diag_ssm_ref",
    "diag_ssm_step",
    "diag_ssm_step_ref",
    "discretize",
    "fft_conv",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "next_fast_len",
    "shift_kernel",
    "shift_kernel_ref",
    "shift_step_ref",
    "short_conv",
    "short_conv_ref",
    "short_conv_step",
    "short_conv_step_ref",
    "ssm_A",
    "step_output_weights",
]
