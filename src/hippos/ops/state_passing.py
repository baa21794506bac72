"""The diagonal SSM over a whole sequence in parallel: chunked state passing and the convolution mode.

Both follow the contract of `hippos.ops` and equal the reference scan `diag_ssm_ref`:

    y, final_state = diag_ssm_chunked(u, dA, dB, C, D=None, initial_state=None, output_final_state=False, *, chunk=64)
    y, final_state = diag_ssm_fft(u, dA, dB, C, D=None, initial_state=None, output_final_state=False, *, chunk=64)

FlashConv state passing runs the SSM one chunk of T steps at a time. With h the complex state entering a
chunk and u_0 .. u_{T-1} its inputs (docs/math.md, "2. Chunked state passing"):

    y_j = sum_{i <= j} K[j - i] u_i + 2 Re(sum_m C_m dA_m^(j+1) h_m)        (intra-chunk + from the state)
    h'  = dA^T h + sum_i dA^(T-1-i) dB u_i                                   (state leaving the chunk)

Per channel that is one T x T Toeplitz matrix and two T x 2M real Vandermonde matrices applied to every chunk
at once as batched matmuls, plus a scan over chunks on the tiny (H, M) state. Exact, O(L (T + M)) work,
memory bounded by the chunk: the CPU's matmul units do what an FFT of the whole sequence would.

The convolution mode convolves with the whole kernel from a zero state; the same chunk operators give what
an initial state adds: the outputs it causes on its own, and the state after the sequence
(docs/math.md, "1. Convolution").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv import causal_conv, compute_dtype, contiguous_grad, from_chunks
from .diagonal import cmul, diag_kernel, vandermonde

__all__ = ["ChunkOperators", "chunk_operators", "diag_ssm_chunked", "diag_ssm_fft"]


@dataclass
class ChunkOperators:
    """Per-channel matrices of one chunk of T steps (M complex modes as 2M interleaved re/im reals)."""

    toeplitz_t: Tensor  # (H, T, T): the transposed Toeplitz matrix, [i, j] = K[j - i] for i <= j, else 0
    w_in: Tensor  # (H, T, 2M): input i -> re/im of dB dA^(T-1-i), its share of the state leaving the chunk
    w_out: Tensor  # (H, 2M, T): re/im of entering state -> output j, 2 Re(C dA^(j+1) h)
    dA_T: Tensor  # (H, M) complex: dA^T, how the state decays over one chunk

    @property
    def T(self) -> int:
        return self.toeplitz_t.shape[-1]


def chunk_operators(dA: Tensor, dB: Tensor, C: Tensor, T: int) -> ChunkOperators:
    """Build the chunk matrices from discrete (dA, dB, C), each (H, M) complex."""
    H, M = dA.shape
    pr, pi = vandermonde(torch.log(dA), torch.arange(T + 1, device=dA.device, dtype=dA.real.dtype))
    w = C * dB
    kernel = 2 * (w.real[..., None] * pr[..., :T] - w.imag[..., None] * pi[..., :T]).sum(1)  # (H, T)
    # Stored transposed and contiguous: chunks are rows, so y = x @ toeplitz^T, and a transposed view here
    # sends bmm's backward into a slow per-matrix path (measured).
    # With kp = [0] * (T - 1) + K, windows[p, q] = kp[p + q], and [i, j] = kp[T - 1 + j - i] = windows[T-1-i, j].
    # (unfold's backward is a dedicated kernel; advanced indexing's is a slow scatter.)
    windows = F.pad(kernel, (T - 1, 0)).unfold(-1, T, 1)
    toeplitz_t = windows.flip(1)
    # Input i reaches the state leaving the chunk through dB dA^(T-1-i).
    in_re, in_im = cmul(dB.real[..., None], dB.imag[..., None], pr[..., :T].flip(-1), pi[..., :T].flip(-1))
    w_in = torch.stack([in_re, in_im], dim=-1).transpose(1, 2).reshape(H, T, 2 * M)
    # The entering state reaches output j through C dA^(j+1); y = 2 Re(.) = 2 (re * h.re - im * h.im).
    out_re, out_im = cmul(C.real[..., None], C.imag[..., None], pr[..., 1:], pi[..., 1:])
    w_out = torch.stack([2 * out_re, -2 * out_im], dim=2).reshape(H, 2 * M, T)
    return ChunkOperators(toeplitz_t, w_in, w_out, torch.complex(pr[..., T], pi[..., T]))


def _powers(dA: Tensor, exponents: Tensor) -> Tensor:
    """dA^e for each exponent as a complex (H, E, M) tensor."""
    return torch.complex(*vandermonde(torch.log(dA), exponents)).transpose(1, 2)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype of SSM states for inputs of this dtype: complex128 for float64, else complex64."""
    return torch.complex128 if compute_dtype(dtype) == torch.float64 else torch.complex64


def _check_state(u: Tensor, dA: Tensor, initial_state: Tensor | None) -> None:
    expected = (*u.shape[:-1], dA.shape[-1])
    if initial_state is not None and initial_state.shape != expected:
        raise ValueError(f"initial_state must be {expected} complex, got {tuple(initial_state.shape)}")


def _prepare(u: Tensor, dA: Tensor, state: Tensor | None):
    """Flatten u (..., H, L) to (R, H, L) in the compute dtype and the state to (H, R, M) complex."""
    _check_state(u, dA, state)
    *lead, H, L = u.shape
    ctype = _complex_dtype(u.dtype)
    uc = u.reshape(-1, H, L).to(compute_dtype(u.dtype))
    R, M = uc.shape[0], dA.shape[-1]
    if state is None:
        h0 = torch.zeros(H, R, M, dtype=ctype, device=u.device)
    else:
        h0 = state.reshape(R, H, M).to(ctype).transpose(0, 1)
    return lead, uc, h0, ctype


def _as_chunks(uc: Tensor, T: int, front: bool) -> Tensor:
    """(R, H, L) -> (H, R * nb, T), zero-padding L up to nb * T at the front or at the back."""
    R, H, L = uc.shape
    nb = -(-L // T)
    pad = (nb * T - L, 0) if front else (0, nb * T - L)
    return F.pad(uc, pad).transpose(0, 1).reshape(H, R * nb, T)


def _state_to_real(h: Tensor) -> Tensor:
    """(H, R, nb, M) complex -> (H, R * nb, 2M) interleaved re/im, the layout of w_out's rows."""
    H, R, nb, M = h.shape
    return torch.view_as_real(h).reshape(H, R * nb, 2 * M)


def diag_ssm_chunked(
    u: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    *,
    chunk: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Diagonal SSM (+ D u) by state passing; u (..., H, L) real -> (y (..., H, L), final state (..., H, M) or None).

    Equal to `diag_ssm_ref` and to `diag_ssm_fft`, for any L and chunk size. initial_state (..., H, M) complex
    is the state before u (zeros when None); the final state is computed only when output_final_state.
    """
    lead, uc, h, ctype = _prepare(u, dA, initial_state)
    R, H, L = uc.shape
    dA, dB, C = dA.to(ctype), dB.to(ctype), C.to(ctype)
    T = max(1, min(chunk, L))
    ops = chunk_operators(dA, dB, C, T)
    x = _as_chunks(uc, T, front=False)  # (H, R nb, T)
    nb = x.shape[1] // R
    s = torch.view_as_complex(torch.bmm(x, ops.w_in).reshape(H, R, nb, -1, 2))  # (H, R, nb, M)
    # The scan is sequential over chunks but each step is a small elementwise op on (H, R, M).
    # unbind once: indexing s[:, :, c] in the loop would make every step's backward write a full-size zero
    # tensor, O(nb^2) work. The state leaving the last chunk is only needed for the final state.
    s_chunks = s.unbind(2)
    entering = [h]
    for s_c in s_chunks[:-1]:
        h = torch.addcmul(s_c, ops.dA_T[:, None], h)
        entering.append(h)
    hs = torch.stack(entering, dim=2)  # (H, R, nb, M): the state entering each chunk
    y = contiguous_grad(torch.baddbmm(torch.bmm(x, ops.toeplitz_t), _state_to_real(hs), ops.w_out))
    y = from_chunks(y, uc, D, lead).to(u.dtype)
    if not output_final_state:
        return y, None
    h = _leaving_last_chunk(h, s_chunks[-1], x.reshape(H, R, nb, T)[:, :, -1], ops, dA, L - (nb - 1) * T)
    return y, h.transpose(0, 1).reshape(*lead, H, -1)


def _leaving_last_chunk(h: Tensor, s_last: Tensor, x_last: Tensor, ops: ChunkOperators, dA: Tensor, r: int) -> Tensor:
    """State (H, R, M) after the last chunk, from the state h entering it, its r real inputs x_last[..., :r]."""
    T = ops.T
    if r == T:
        return torch.addcmul(s_last, ops.dA_T[:, None], h)
    # The last chunk was zero-padded at the back: advance its entering state over its r real inputs only.
    H, R = x_last.shape[:2]
    s_r = torch.view_as_complex(torch.bmm(x_last[..., :r], ops.w_in[:, T - r :]).reshape(H, R, -1, 2))
    return torch.exp(torch.log(dA) * r)[:, None] * h + s_r


def diag_ssm_fft(
    u: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    *,
    chunk: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Diagonal SSM (+ D u) as a convolution with its whole kernel; u (..., H, L) -> (y, final state or None).

    The kernel comes from `diag_kernel` and the convolution from `causal_conv` (a real FFT, or one Toeplitz
    matmul up to 128 steps). An initial state adds the outputs it causes on its own; the final state is
    summed chunk by chunk. `chunk` sizes those two state terms only. Equal to `diag_ssm_ref`.
    """
    _check_state(u, dA, initial_state)
    L = u.shape[-1]
    y = causal_conv(u, diag_kernel(dA, dB, C, L), D)
    if initial_state is not None:
        y = y + _state_outputs(initial_state, dA, C, L, u.dtype, chunk)
    final = _final_state(u, dA, dB, initial_state, chunk) if output_final_state else None
    return y, final


def _state_outputs(state: Tensor, dA: Tensor, C: Tensor, L: int, dtype: torch.dtype, chunk: int) -> Tensor:
    """Outputs caused by an initial state alone, y_t = 2 Re(sum_m C_m dA_m^(t+1) h_m); -> (..., H, L)."""
    *lead, H, M = state.shape
    ctype = _complex_dtype(dtype)
    dA, C = dA.to(ctype), C.to(ctype)
    T = max(1, min(chunk, L))
    nb = -(-L // T)
    ops = chunk_operators(dA, torch.zeros_like(dA), C, T)
    h = state.reshape(-1, H, M).to(ctype).transpose(0, 1)  # (H, R, M)
    decay = _powers(dA, torch.arange(nb, device=dA.device, dtype=dA.real.dtype) * T)  # (H, nb, M): dA^(b T)
    y = torch.bmm(_state_to_real(h[:, :, None] * decay[:, None]), ops.w_out)
    return y.reshape(H, -1, nb * T)[..., :L].transpose(0, 1).reshape(*lead, H, L).to(dtype)


def _final_state(u: Tensor, dA: Tensor, dB: Tensor, state: Tensor | None, chunk: int) -> Tensor:
    """State after the sequence u (..., H, L) from `state` (zeros when None); -> (..., H, M) complex.

    h_L = dA^L h_0 + sum_i dA^(L-1-i) dB u_i, summed chunk by chunk: zeros in front of u add nothing.
    """
    lead, uc, h0, ctype = _prepare(u, dA, state)
    R, H, L = uc.shape
    dA, dB = dA.to(ctype), dB.to(ctype)
    T = max(1, min(chunk, L))
    ops = chunk_operators(dA, dB, torch.zeros_like(dA), T)
    x = _as_chunks(uc, T, front=True)
    nb = x.shape[1] // R
    s = torch.view_as_complex(torch.bmm(x, ops.w_in).reshape(H, R, nb, -1, 2))
    ages = torch.arange(nb - 1, -1, -1, device=u.device, dtype=dA.real.dtype) * T
    decay = _powers(dA, ages)  # (H, nb, M): dA^(T (nb-1-c))
    h = torch.exp(torch.log(dA) * L)[:, None] * h0 + (s * decay[:, None]).sum(2)
    return h.transpose(0, 1).reshape(*lead, H, -1)
