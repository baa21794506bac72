"""The LM head and its cross-entropy in one pass over row chunks, never holding all (N, V) logits.

    loss = mean_i [ logsumexp_v (h_i . W_v) - h_i . W_{y_i} ]

`linear_cross_entropy_ref` is the definition (full logits, then `F.cross_entropy`). `linear_cross_entropy`
computes the same loss a chunk of rows at a time and, when gradients are wanted, the gradients of those rows
right away (softmax minus one-hot, times W; and into dW), so the backward pass only scales them. At the
125M shape and L = 2048 the full logits, their log-softmax and their gradient are three (2047, 50264) fp32
tensors, 412 MB each, and the CPU spends long on allocating and page-faulting them (measured side by side on
the 2-core CPU of benchmarks/RESULTS.md: an H3-125M training step at L = 2048 took 12.9 s with the reference
and 11.6 s chunked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import values_known
from .conv import compute_dtype

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]

# Float32 logits per chunk. Each chunk adds its rank-`rows` update to dW (V x D), a pass over all of dW, so
# chunks should be large; but glibc serves blocks above 32 MiB with fresh mmaps, page-faulted on every use.
# H3-125M training step at L = 2048 on the 2-core CPU: 12.0 s with 8 MiB chunks, 11.2 s with 32 MiB (one run,
# side by side); 11.7 s with 128 MiB against 10.6 s with 32 MiB (another).
CHUNK_BYTES = 32 << 20


def _check(h: Tensor, W: Tensor, labels: Tensor) -> None:
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"h must be (N, D) and W (V, D) with the same D, got {tuple(h.shape)} and {tuple(W.shape)}")
    if labels.shape != (h.shape[0],) or labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 of shape ({h.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("no labels: the mean cross-entropy of zero tokens is undefined")
    if not values_known(labels):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= W.shape[0]:
        raise ValueError(f"labels must lie in [0, {W.shape[0]}), got {low} .. {high}")


def linear_cross_entropy_ref(h: Tensor, W: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits h W^T against labels, in float32 (float64 for float64); h (N, D), W (V, D)."""
    _check(h, W, labels)
    return F.cross_entropy(F.linear(h, W).to(compute_dtype(h.dtype)), labels)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked loss whose forward also produces the gradients (they need the same softmax)."""

    @staticmethod
    def forward(ctx, h: Tensor, W: Tensor, labels: Tensor, rows: int) -> Tensor:
        N = h.shape[0]
        want_h, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt = compute_dtype(h.dtype)
        Wc = W.to(cdt)
        grad_h = torch.empty(h.shape, dtype=cdt, device=h.device) if want_h else None
        grad_W = None
        total = torch.zeros((), dtype=cdt, device=h.device)
        for s in range(0, N, rows):
            hc, yc = h[s : s + rows].to(cdt), labels[s : s + rows]
            logits = hc @ Wc.T
            target = logits.gather(1, yc[:, None])[:, 0]
            # logsumexp by hand, in place in the logits' memory: exp(logits - max) is also the softmax's
            # numerator (torch.logsumexp would allocate and fill its own chunk-sized temporary).
            top = logits.amax(dim=-1)
            expd = logits.sub_(top[:, None]).exp_()
            norm = expd.sum(dim=-1)
            total += (top + norm.log() - target).sum()
            if not (want_h or want_W):
                continue
            # d mean_loss / d logits = (softmax - one_hot(y)) / N
            probs = expd.mul_((1 / (N * norm))[:, None])
            probs[torch.arange(len(yc), device=h.device), yc] -= 1 / N
            if want_h:
                torch.mm(probs, Wc, out=grad_h[s : s + rows])
            if want_W:
                grad_W = probs.T @ hc if grad_W is None else grad_W.addmm_(probs.T, hc)
        # Kept as attributes, not saved tensors: backward hands them over as the only reference, so autograd
        # can reuse their memory (for the tied embedding's gradient, added in place) instead of copying.
        ctx.grads, ctx.dtypes = [grad_h, grad_W], (h.dtype, W.dtype)
        return total / N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy's backward runs once per forward: compute the loss again")
        # A plain loss.backward() needs no scaling copy; where the gradient's value cannot be read (fake
        # tensors, compiling), scaling is always right.
        scale = not values_known(grad_loss) or not bool(grad_loss == 1)
        for i, dtype in enumerate(ctx.dtypes):
            if grads[i] is not None:
                grads[i] = (grads[i] * grad_loss if scale else grads[i]).to(dtype)
        return grads[0], grads[1], None, None


def linear_cross_entropy(h: Tensor, W: Tensor, labels: Tensor) -> Tensor:
    """Same as `linear_cross_entropy_ref`, chunked over rows; h (N, D), W (V, D), labels (N,) -> scalar.

    Under autocast the reference runs instead, so that the head's matmul follows autocast's precision rules.
    """
    if torch.is_autocast_enabled(h.device.type):
        return linear_cross_entropy_ref(h, W, labels)
    _check(h, W, labels)
    rows = max(1, (CHUNK_BYTES - 1) // (4 * W.shape[0]))  # strictly below the 32 MiB
    return _LinearCrossEntropy.apply(h, W, labels, rows)
