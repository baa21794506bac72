"""Linear layers for decode steps, where a handful of rows meets a whole weight matrix.

A decode step reads every weight once for a few activations, so it is bound by memory bandwidth. On the CPU,
the BLAS matrix-vector product (MKL sgemv) runs on one core: 16 GB/s on the 2-core machine of
benchmarks/RESULTS.md, where a blocked product reaches 50-62 GB/s. Splitting the weight's rows into 8 blocks
and running them as one batched matmul lets every core stream its own block. Measured there:

    batch 1:  768x768 16 -> 50 GB/s, 3072x768 16 -> 58, 768x3072 22 -> 59, 50264x768 16 -> 60
    batch 16: equal or better only for very wide outputs (the LM head: 3 -> 11 GB/s); else F.linear.

Accelerators use F.linear unchanged. Layers that are not a plain nn.Linear (Int8Linear: int8 weights, their own
CPU kernel, docs/quantization.md) run their own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCKS = 8  # row blocks: enough for a few cores to each stream one
SMALL_BATCH = 4  # up to this many rows, blocks always pay
WIDE_OUTPUT = 8192  # from this many output features, blocks pay at any batch size


def decode_linear(linear: nn.Module, x: Tensor) -> Tensor:
    """linear(x) for x (B, in) with small B, faster on the CPU; same result up to summation order."""
    if not isinstance(linear, nn.Linear):
        return linear(x)
    W = linear.weight
    rows, out_features = x.shape[0], W.shape[0]
    if (
        W.device.type != "cpu"
        or out_features % BLOCKS
        or x.dim() != 2
        or (rows > SMALL_BATCH and out_features < WIDE_OUTPUT)
    ):
        return F.linear(x, W, linear.bias)
    blocks, xt = W.view(BLOCKS, out_features // BLOCKS, W.shape[1]), x.T.expand(BLOCKS, -1, -1)
    # With a bias, it is added inside the product: one operation less per linear and step.
    bias = None if linear.bias is None else linear.bias.view(BLOCKS, -1, 1)
    y = blocks.bmm(xt) if bias is None else torch.baddbmm(bias, blocks, xt)
    return y.reshape(out_features, rows).T
