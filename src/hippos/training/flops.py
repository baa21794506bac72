"""FLOP counts for the MFU estimate in the training log, and the machine's measured matmul rate.

Model FLOPs per trained token follow the usual accounting: 6 per parameter that multiplies the token
(forward 2, backward 4; the embedding lookup is free, the tied head is not), plus attention's scores and
weighted sum, 12 * d_model * seq_len per attention layer (causal masking not discounted, as is customary).
H3's FFT convolutions and SSM kernels cost O(d_model * L log L), a few percent at these sizes, and are left
out, so MFU slightly understates the work done.
"""

from __future__ import annotations

import time

import torch

from ..models import H3Config


def flops_per_token(config: H3Config, num_parameters: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter, plus attention's 12 * d_model * seq_len per attention layer.

    num_parameters counts the tied embedding once: its lookup is free, and the head multiplies by it.
    """
    attention = 12 * len(config.attn_layer_idx) * config.d_model * seq_len
    return 6.0 * num_parameters + attention


def matmul_tflops(device="cpu", size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul rate (TFLOP/s) of this device: the peak that MFU is quoted against on a CPU."""
    a = torch.randn(size, size, device=device)
    times = []
    for i in range(repeats + 1):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ a
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12
