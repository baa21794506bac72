"""Pure tensor functions behind the layers: SSM kernels, convolutions, recurrences, state passing.

Every fast path has a readable reference with the same meaning (`*_ref`), and the tests hold them equal.
"""

from .conv import causal_conv, causal_conv_ref, compute_dtype, fft_conv, next_fast_len, short_conv, short_conv_step
from .diagonal import (
    diag_kernel,
    diag_kernel_ref,
    diag_scan_ref,
    diag_step,
    diag_step_prepared,
    discretize,
    ssm_A,
    step_output_weights,
)
from .loss import linear_cross_entropy, linear_cross_entropy_ref
from .shift import shift_kernel, shift_kernel_ref, shift_step_ref
from .state_passing import chunk_operators, diag_final_state, diag_ssm_chunked, diag_state_outputs

__all__ = [
    "causal_conv_ref",
    "chunk_operators",
    "compute_dtype",
    "diag_final_state",
    "diag_kernel",
    "diag_kernel_ref",
    "diag_scan_ref",
    "diag_ssm_chunked",
    "diag_state_outputs",
    "diag_step",
    "diag_step_prepared",
    "discretize",
    "causal_conv",
    "fft_conv",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "next_fast_len",
    "shift_kernel",
    "shift_kernel_ref",
    "shift_step_ref",
    "short_conv",
    "short_conv_step",
    "ssm_A",
    "step_output_weights",
]
