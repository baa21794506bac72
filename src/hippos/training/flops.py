"""FLOP counts of a training step: the TFLOP/s and MFU of the training log, and the benchmarks' floors.

Model FLOPs per trained token follow the usual accounting: 6 per parameter that multiplies the token
(forward 2, backward 4; the embedding lookup is free, the tied head is not), plus attention's scores and
weighted sum, 12 * d_model * seq_len per attention layer (causal masking not discounted, as is customary).
H3's FFT convolutions and SSM kernels cost O(d_model * L log L), a few percent at these sizes, and are left
out, so MFU slightly understates the work done. The peak that MFU is quoted against is measured by
hippos.benchmarks.measure.matmul_tflops (training only counts; it does not measure).
"""

from __future__ import annotations

from ..models import H3Config


def flops_per_token(config: H3Config, num_parameters: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter, plus attention's 12 * d_model * seq_len per attention layer.

    num_parameters counts the tied embedding once: its lookup is free, and the head multiplies by it.
    """
    attention = 12 * len(config.attn_layer_idx) * config.d_model * seq_len
    return 6.0 * num_parameters + attention
