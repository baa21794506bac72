"""Baselines that hippos is measured against, written from their published descriptions.

`OfficialH3Port` follows the official H3 layer's plain PyTorch path (no fused kernels): both convolutions
by real FFTs of size 2L, the shift kernel from an FFT of B and C, and the diagonal kernel recomputed every
call from a materialised (H, M, L) Vandermonde matrix. It holds the same parameters as `hippos.layers.H3`
(head_dim 1) so the two can be checked against each other before being timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import H3


def _fftconv_2l(u: Tensor, k: Tensor, D: Tensor) -> Tensor:
    """y = k * u + D u with FFTs of size 2L; u (B, H, L), k (H, L)."""
    L = u.shape[-1]
    n = 2 * L
    k_f = torch.fft.rfft(k, n=n) / n
    u_f = torch.fft.rfft(u, n=n)
    y = torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :L]
    return y + u * D[:, None]


class OfficialH3Port(nn.Module):
    """The official H3 layer's plain PyTorch forward (head_dim 1); parameters copied from an `H3`."""

    def __init__(self, layer: H3):
        super().__init__()
        if layer.head_dim != 1:
            raise ValueError("the official plain path is ported for head_dim 1 only")
        self.layer = layer  # shares parameters: the port differs only in how it computes

    def shift_kernel(self, L: int) -> Tensor:
        """Shift kernel by FFT cross-correlation of C and B, zero-padded to L; (H, L)."""
        B, C = self.layer.shift.B, self.layer.shift.C
        N = B.shape[-1]
        k = torch.fft.irfft(torch.fft.rfft(C, n=2 * N) * torch.fft.rfft(B, n=2 * N).conj(), n=2 * N)[..., :N]
        return F.pad(k, (0, L - N)) if L > N else k[..., :L]

    def diag_kernel(self, L: int) -> Tensor:
        """Diagonal kernel 2 Re(sum C dB dA^l) through a materialised (H, M, L) Vandermonde matrix."""
        dA, dB, C = self.layer.diag.discrete()
        vandermonde = torch.exp(torch.log(dA)[..., None] * torch.arange(L, device=dA.device))
        return 2 * torch.einsum("hm,hml->hl", C * dB, vandermonde).real

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        m = self.layer
        L = x.shape[1]
        q, k, v = (proj(x).transpose(1, 2) for proj in (m.q_proj, m.k_proj, m.v_proj))
        k = _fftconv_2l(k, self.shift_kernel(L), m.ssm_k_D)
        y = _fftconv_2l(k * v, self.diag_kernel(L), m.D)
        return m.output_linear((q * y).transpose(1, 2))
