"""Causal convolutions along the last axis: y = K * u + D u, per channel.

Layout everywhere in `hippos.ops`: inputs `u` are (..., H, L) with channels H and time L last, kernels are
(H, Lk). Leading dimensions are any batch shape. A kernel shorter than the sequence is zero beyond its end;
a longer one is truncated.

Three implementations of the same map, tested against each other:
- `causal_conv_ref`: the definition, a sum over kernel taps. O(L * Lk); readable, for tests.
- `fft_conv`: real FFTs of a size that cannot alias (>= L + Lk - 1), processed in channel groups small
  enough to stay in cache, with a hand-written backward that recomputes the transforms instead of storing
  them. The default long convolution.
- `short_conv`: block-Toeplitz matmuls for short filters (the shift SSM's 64 taps), which need no FFT of
  the whole sequence. It is also the shift SSM itself, so it follows the SSM contract of `hippos.ops`: it can
  start from a window of the inputs that came before and return the window after the sequence
  (`short_conv_ref` and the steps `short_conv_step` / `short_conv_step_ref` beside it).
`causal_conv` picks between the last two by sequence length.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import values_known

__all__ = [
    "causal_conv",
    "causal_conv_ref",
    "compute_dtype",
    "contiguous_grad",
    "fft_conv",
    "next_fast_len",
    "short_conv",
    "short_conv_ref",
    "short_conv_step",
    "short_conv_step_ref",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype SSM math runs in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (sizes pocketFFT handles fastest)."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()  # the power of two is always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    """x unchanged, but the gradient flowing back into it is made contiguous once.

    Gradients arriving from a (B, L, D) model in our (B, D, L) layout are transposed views; batched matmuls
    and convolutions then fall back to per-matrix copies (measured: thousands of small copies per layer).
    """
    return _ContiguousGrad.apply(x) if x.requires_grad else x


def _check_conv_args(u: Tensor, k: Tensor, D: Tensor | None) -> None:
    if u.dim() < 2:
        raise ValueError(f"u must be (..., H, L), got shape {tuple(u.shape)}")
    if k.dim() != 2 or k.shape[0] != u.shape[-2]:
        raise ValueError(f"kernel must be (H, Lk) with H = {u.shape[-2]}, got {tuple(k.shape)}")
    if D is not None and D.shape != (u.shape[-2],):
        raise ValueError(f"D must be (H,) = ({u.shape[-2]},), got {tuple(D.shape)}")
    if not u.is_floating_point() or not k.is_floating_point():
        raise TypeError(f"u and kernel must be floating point, got {u.dtype} and {k.dtype}")


def causal_conv_ref(u: Tensor, k: Tensor, D: Tensor | None = None) -> Tensor:
    """Reference causal convolution y[t] = sum_i k[i] u[t - i] (+ D u[t]); u (..., H, L), k (H, Lk)."""
    _check_conv_args(u, k, D)
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for i in range(min(k.shape[-1], L)):
        y[..., i:] = y[..., i:] + k[:, i, None] * u[..., : L - i]
    if D is not None:
        y = y + D[:, None] * u
    return y


def _channel_group(n_fft: int) -> int:
    # About 2 MiB of fp32 signal per group keeps the transforms in cache; measured 3.5x faster than
    # transforming all 768 channels at once for L = 8192 on a 2-core x86 machine.
    return max(1, (1 << 19) // n_fft)


def _fft_conv_forward(u: Tensor, k: Tensor, n: int) -> Tensor:
    """y = irfft(rfft(u) rfft(k))[:L] in channel groups; u (R, H, L), k (H, Lk), computed in u.dtype."""
    L = u.shape[-1]
    y = torch.empty_like(u)
    g = _channel_group(n)
    for s in range(0, u.shape[1], g):
        kf = torch.fft.rfft(k[s : s + g], n=n)
        uf = torch.fft.rfft(u[:, s : s + g], n=n)
        y[:, s : s + g] = torch.fft.irfft(uf * kf, n=n)[..., :L]
    return y


class _FFTConv(torch.autograd.Function):
    """Causal FFT convolution with a backward that recomputes the transforms (memory: inputs only)."""

    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor, n: int) -> Tensor:  # u (R, H, L), k (H, Lk)
        ctx.save_for_backward(u, k)
        ctx.n = n
        return _fft_conv_forward(u, k, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        u, k = ctx.saved_tensors
        n, L, Lk = ctx.n, u.shape[-1], k.shape[-1]
        grad_y = grad_y.contiguous()
        grad_u = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        grad_k = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        g = _channel_group(n)
        for s in range(0, u.shape[1], g):
            sl = slice(s, s + g)
            gf = torch.fft.rfft(grad_y[:, sl], n=n)
            # Correlations instead of convolutions: conj() in frequency space. n >= L + Lk - 1 guarantees
            # that the circular wrap-around lands only where the other operand is zero.
            if grad_u is not None:
                grad_u[:, sl] = torch.fft.irfft(gf * torch.fft.rfft(k[sl], n=n).conj(), n=n)[..., :L]
            if grad_k is not None:
                cross = (gf * torch.fft.rfft(u[:, sl], n=n).conj()).sum(0)
                grad_k[sl] = torch.fft.irfft(cross, n=n)[..., :Lk]
        return grad_u, grad_k, None


def fft_conv(u: Tensor, k: Tensor, D: Tensor | None = None) -> Tensor:
    """Causal convolution by real FFT, y = k * u + D u; u (..., H, L), k (H, Lk) -> (..., H, L).

    Any length works (odd, 1, not a power of two). Half-precision inputs are computed in float32 and the
    result is returned in the input dtype.
    """
    _check_conv_args(u, k, D)
    *lead, H, L = u.shape
    cdt = compute_dtype(u.dtype)
    k = k[:, :L].to(cdt)
    n = next_fast_len(L + k.shape[-1] - 1)
    uc = u.reshape(-1, H, L).to(cdt)
    y = _FFTConv.apply(uc.contiguous(), k.contiguous(), n)
    if D is not None:
        y = torch.addcmul(y, D.to(cdt)[:, None], uc)
    return y.reshape(*lead, H, L).to(u.dtype)


# Up to this length a whole-sequence Toeplitz matmul beats the FFT: forward + backward of (32, 8, 128, L)
# inputs with full-length kernels, one CPU thread, measured 3.1x at L = 32, 2.5x at 64, 3.3x at 128, even at
# 256 and 0.6x at 512 (the matmul grows as L^2, the FFT as L log L).
TOEPLITZ_MAX_LEN = 128


def causal_conv(u: Tensor, k: Tensor, D: Tensor | None = None) -> Tensor:
    """Causal convolution by the faster exact method for the length; u (..., H, L), k (H, Lk) -> (..., H, L).

    Sequences up to TOEPLITZ_MAX_LEN steps go through `short_conv` (one Toeplitz matmul), longer through
    `fft_conv`.
    """
    if u.shape[-1] <= TOEPLITZ_MAX_LEN:
        return short_conv(u, k, D)[0]
    return fft_conv(u, k, D)


def from_chunks(y: Tensor, uc: Tensor, D: Tensor | None, lead: list[int]) -> Tensor:
    """Chunked (H, R * nb, T) output -> contiguous (*lead, H, L), with the skip term D u added."""
    R, H, L = uc.shape
    y = y.reshape(H, R, -1)[..., :L].transpose(0, 1)
    y = y.contiguous() if D is None else torch.addcmul(y, D.to(y.dtype)[:, None], uc)
    return y.reshape(*lead, H, L)


def _toeplitz_selector(Lk: int, T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """0/1 matrix (Lk, 2T * T) with k @ it = the stacked blocks of `_short_filter_blocks`, flattened."""
    # Made on the device itself, without indexing by a mask (which reads the mask back to the host).
    i, j = torch.arange(2 * T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    tap = (T + j - i).flatten()  # which tap entry [i, j] holds; one outside 0 .. Lk - 1 matches no row
    return (tap == torch.arange(Lk, device=device)[:, None]).to(dtype)


@functools.lru_cache(maxsize=32)
def _cached_toeplitz_selector(Lk: int, T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`_toeplitz_selector`, kept for later calls with the same arguments."""
    with torch.inference_mode(False):  # cached for later calls: must not be an inference tensor
        return _toeplitz_selector(Lk, T, dtype, device)


def _short_filter_blocks(k: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """(W_prev, W_cur), each (H, T, T): y_chunk = x_prev @ W_prev + x_cur @ W_cur for a filter of <= T taps.

    Entry [i, j] of the stacked (2T, T) matrix [W_prev; W_cur] is k[T + j - i] (zero outside 0 .. Lk - 1).
    Built as one matmul with a constant 0/1 selector, exact in any dtype; its backward is the transposed
    matmul. (Slicing unfolded, flipped windows of k instead was measured 1.3-2.6x slower forward + backward
    at H3-125M's 768 channels and 64 taps: that backward zero-fills and scatters into large buffers.)
    """
    H, Lk = k.shape
    # A fake tensor (no values) must not outlive its FakeTensorMode in the cache.
    selector = (_cached_toeplitz_selector if values_known(k) else _toeplitz_selector)(Lk, T, k.dtype, k.device)
    stacked = (k @ selector).view(H, 2 * T, T)
    return stacked[:, :T], stacked[:, T:]


# ---- short_conv: the shift SSM as a convolution, with its state (the last W inputs) ---------------------------


def _check_window(u: Tensor, initial_state: Tensor | None) -> None:
    if initial_state is not None and initial_state.shape[:-1] != u.shape[:-1]:
        raise ValueError(f"initial_state must be {(*u.shape[:-1], 'W')}, got {tuple(initial_state.shape)}")


def _window_dtype(u: Tensor, initial_state: Tensor | None) -> torch.dtype:
    """A window keeps the dtype it was given; a new one is in the compute dtype (SSM states in fp32)."""
    return compute_dtype(u.dtype) if initial_state is None else initial_state.dtype


def _last_inputs(u: Tensor, initial_state: Tensor | None, W: int) -> Tensor:
    """The window after u: its last W inputs (..., H, W), oldest first, the given window's tail in front if L < W."""
    dtype, L = _window_dtype(u, initial_state), u.shape[-1]
    if L >= W:
        # Always a copy, never a view of u: a state kept for decoding must not hold on to the whole sequence.
        return u[..., L - W :].to(dtype, copy=True, memory_format=torch.contiguous_format)
    if initial_state is None:
        return F.pad(u.to(dtype), (W - L, 0))
    return torch.cat([initial_state[..., L:], u.to(dtype)], dim=-1)


def short_conv_ref(
    u: Tensor, k: Tensor, D: Tensor | None = None, initial_state: Tensor | None = None, output_final_state: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Reference `short_conv`: the direct convolution of [window, u], read after the window; same signature."""
    _check_conv_args(u, k, D)
    _check_window(u, initial_state)
    dtype = _window_dtype(u, initial_state)
    past = initial_state if initial_state is not None else u.new_zeros(*u.shape[:-1], k.shape[-1], dtype=dtype)
    W = past.shape[-1]
    y = causal_conv_ref(torch.cat([past.to(u.dtype), u], dim=-1), k, D)[..., W:]
    final = torch.cat([past, u.to(dtype)], dim=-1)[..., -W:] if output_final_state else None
    return y, final


def short_conv(
    u: Tensor, k: Tensor, D: Tensor | None = None, initial_state: Tensor | None = None, output_final_state: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Causal convolution with a short filter (Lk <= 64 taps by default); u (..., H, L), k (H, Lk) -> (y, window).

    The state is a window (..., H, W) of the inputs just before u, oldest first: the shift SSM's shift register
    (docs/math.md, "The shift SSM"). `initial_state` starts from one (zeros when None, W = Lk then); the final
    state is the window after u, of the same width W, in the window's dtype (the compute dtype for a new one).
    Work O(L * max(Lk, 64)) as two batched matmuls per block of 64 steps with block-Toeplitz matrices, no FFT.
    (Measured 1.4-2x faster forward + backward than a depthwise conv1d, whose backward also slows down 6x or
    more for some gradient layouts.)
    """
    _check_conv_args(u, k, D)
    _check_window(u, initial_state)
    y = _short_conv_output(u, k, D, initial_state)
    if not output_final_state:
        return y, None
    W = k.shape[-1] if initial_state is None else initial_state.shape[-1]
    return y, _last_inputs(u, initial_state, W)


def _short_conv_output(u: Tensor, k: Tensor, D: Tensor | None, history: Tensor | None) -> Tensor:
    """The outputs of `short_conv` (arguments checked there)."""
    *lead, H, L = u.shape
    if history is None and k.shape[-1] > L:
        k = k[..., :L]  # from zeros, taps beyond the sequence never touch it (short synthetic sequences)
    Lk = k.shape[-1]
    T = max(Lk, min(64, L))  # blocks no longer than the sequence: no work on padding
    cdt = compute_dtype(u.dtype)
    uc = u.reshape(-1, H, L).to(cdt)
    R, nb = uc.shape[0], -(-L // T)
    # Chunk c of the output needs input chunks c - 1 (prev) and c (cur): two views of one padded tensor,
    # laid out (H, R, T + nb T) so that the channel is the batch of the matmuls. Missing history is zero.
    x = uc.new_zeros(H, R, (nb + 1) * T)
    x[:, :, T : T + L] = uc.transpose(0, 1)
    if history is not None:
        past = history[..., max(0, history.shape[-1] - T) :].reshape(R, H, -1)
        x[:, :, T - past.shape[-1] : T] = past.transpose(0, 1)
    prev = x[..., : nb * T].reshape(H, R * nb, T)
    cur = x[..., T:].reshape(H, R * nb, T)
    w_prev, w_cur = _short_filter_blocks(k.to(cdt), T)
    if nb == 1 and history is None:  # one block from zeros: its previous block is all zeros, skip that matmul
        y = contiguous_grad(torch.bmm(cur, w_cur))
    else:
        y = contiguous_grad(torch.baddbmm(torch.bmm(cur, w_cur), prev, w_prev))
    return from_chunks(y, uc, D, lead).to(u.dtype)


def short_conv_step_ref(
    u_t: Tensor, state: Tensor, k: Tensor, D: Tensor | None = None, *, in_place: bool = False
) -> tuple[Tensor, Tensor]:
    """Reference `short_conv_step`: shift u_t into the window, y_t = sum_i k[i] u_(t-i) (+ D u_t); same signature."""
    W, Lk = state.shape[-1], k.shape[-1]
    if Lk > W:
        raise ValueError(f"a window of {W} inputs cannot feed a filter of {Lk} taps (need W >= Lk)")
    new = torch.cat([state[..., 1:], u_t[..., None].to(state.dtype)], dim=-1)
    state = state.copy_(new) if in_place else new
    y = sum(k[:, i].to(state.dtype) * state[..., W - 1 - i] for i in range(Lk))  # tap i reads the input i steps back
    if D is not None:
        y = y + D.to(state.dtype) * u_t.to(state.dtype)
    return y.to(u_t.dtype), state


def short_conv_step(
    u_t: Tensor,
    state: Tensor,
    k: Tensor,
    D: Tensor | None = None,
    *,
    flipped: Tensor | None = None,
    in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """One step of `short_conv`; u_t (..., H), state (..., H, W >= Lk) -> (y_t (..., H), new window).

    The new window has u_t appended and its oldest input dropped. `flipped` may hold k.flip(-1), computed
    once for many steps (decoding). in_place: the new window is written into `state` and returned (for a caller
    that owns the state alone; not under autograd). No argument checks here: a decode step is measured in
    microseconds, and the layers check the state's shape.
    """
    if in_place:
        older = state[..., 1:].clone()  # copying a window onto itself shifted by one would race between threads
        state[..., :-1] = older
        state[..., -1] = u_t.to(state.dtype)
    else:
        state = torch.cat([state[..., 1:], u_t[..., None].to(state.dtype)], dim=-1)
    Lk = k.shape[-1]
    flipped = k.flip(-1) if flipped is None else flipped
    y = torch.linalg.vecdot(state[..., state.shape[-1] - Lk :], flipped.to(state.dtype))
    if D is not None:
        y = torch.addcmul(y, D.to(y.dtype), u_t.to(y.dtype))
    return y.to(u_t.dtype), state
