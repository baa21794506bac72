"""Linear layers with int8 weights for CPU inference (docs/quantization.md).

A weight W (out, in) is stored as int8 Q with one float32 scale per output channel (row):

    s[o] = max_i |W[o, i]| / 127,   Q[o, i] = round(W[o, i] / s[o]) in [-127, 127],   y = x Q^T * s + b

Two ways to run it, with the same signature:

- `int8_linear_ref`: the definition, `(x @ Q^T) * s + b` in x's dtype. Runs on every device and dtype; it is
  the fallback wherever the fast path cannot run.
- `int8_linear`: on a CPU with PyTorch's x86/fbgemm quantized engine, the int8 product of
  `torch.ops.quantized.linear_dynamic`: it also quantizes x, per tensor and at run time, to 7-bit unsigned
  integers (reduce_range: the AVX2 kernels add pairs of 8-bit products into 16 bits, which 8 bits could
  overflow) and accumulates in int32. Decode steps read a quarter of the fp32 bytes (docs/quantization.md has
  the measurements). It needs the weight once in fbgemm's packed form (`pack_int8`), which `Int8Linear` keeps.

The packed form is built from a `torch.qint8` tensor, a dtype PyTorch 2.13 deprecated; its removal (or any
failure to pack) makes `pack_int8` return None, and everything runs on the reference instead.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

QMAX = 127  # symmetric: -128 is never used, so -Q is representable for every Q
REDUCE_RANGE = True  # 7-bit activations on the fast path: no 16-bit overflow in the AVX2 int8 kernels
FAST_ENGINES = ("x86", "fbgemm")  # the quantized engines whose dynamic linear the tests cover


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (out, in) float -> (int8 Q (out, in), float32 scale (out,)), symmetric per output channel."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a float (out, in) weight matrix, got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    amax = w.abs().amax(dim=1)
    # An all-zero row quantizes to zeros under any scale; 1 keeps the scale positive, as fbgemm requires.
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.to(torch.float32)


def int8_linear_ref(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) -> (..., out) = (x @ Q^T) * scale + bias in x's dtype: the definition, on any device."""
    _check_input(x, qweight)
    y = (x @ qweight.T.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int8_linear(
    x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, *, packed: object | None = None
) -> Tensor:
    """x (..., in) -> (..., out), int8 x int8 on the CPU when `packed` (from pack_int8) is given, else the ref.

    The fast path takes float32 CPU inputs; other dtypes and devices, and packed None, run int8_linear_ref.
    """
    if packed is None or x.dtype != torch.float32 or not x.is_cpu:
        return int8_linear_ref(x, qweight, scale, bias)
    _check_input(x, qweight)
    if x.numel() == 0:  # fbgemm refuses empty inputs; nothing to compute
        return x.new_zeros(*x.shape[:-1], qweight.shape[0])
    if x.dim() == 1:  # the kernel takes (rows, in) at least
        return _linear_dynamic()(x[None], packed, REDUCE_RANGE)[0]
    return _linear_dynamic()(x, packed, REDUCE_RANGE)


@functools.cache
def _linear_dynamic():
    """The fast path's kernel, looked up once (torch.ops lookups cost microseconds a call)."""
    return torch.ops.quantized.linear_dynamic.default


def fast_path_available() -> bool:
    """Whether this PyTorch build can run int8_linear's fast path (the x86/fbgemm quantized engine)."""
    engine = torch.backends.quantized.engine
    return (
        engine in FAST_ENGINES
        and engine in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_dynamic")
        and hasattr(torch.ops.quantized, "linear_prepack")
    )


def pack_int8(qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> object | None:
    """fbgemm's packed form of (Q (out, in), scale (out,), bias) for int8_linear, or None where it cannot run."""
    if qweight.device.type != "cpu" or not fast_path_available():
        return None
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
    dequantized = qweight.to(torch.float32) * scale.to(torch.float32)[:, None]
    try:
        with warnings.catch_warnings():
            # PyTorch 2.13 warns that qint8 tensors are deprecated (docs/quantization.md: the fallback).
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*", category=UserWarning)
            qw = torch.quantize_per_channel(dequantized, scale.double(), zero_points, 0, torch.qint8)
            b = None if bias is None else bias.detach().to(torch.float32)
            return torch.ops.quantized.linear_prepack(qw, b)
    except (RuntimeError, AttributeError, NotImplementedError):  # the engine or the dtype is gone: fall back
        return None


def _check_input(x: Tensor, qweight: Tensor) -> None:
    """Refuse an input whose last axis is not the weight's input width, or that is not floating point."""
    if x.dim() == 0 or x.shape[-1] != qweight.shape[1] or not x.is_floating_point():
        raise ValueError(
            f"int8 linear layer takes float (..., {qweight.shape[1]}) inputs, got {x.dtype} {tuple(x.shape)}"
        )


class Int8Linear(nn.Module):
    """y = x Q^T * scale + bias with int8 Q; x (..., in) -> (..., out) in x's dtype. Inference only.

    Q (`qweight`), `scale` and `bias` are buffers, so they move with `.to()` and save in safetensors files.
    The fbgemm packed copy is made on the first call and dropped whenever the buffers are moved, loaded or
    assigned (an in-place edit of a buffer's values needs `repack()`). Decode steps call each layer once per
    token, so the call itself is kept to a few checks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        bias_buffer = torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None
        self.register_buffer("bias", bias_buffer)
        self.repack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """An Int8Linear of linear's weight (per-output-channel int8) and bias (kept in float32)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        module.qweight, module.scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().to(torch.float32).clone()
        return module

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in), Q * scale: a new tensor for code that reads a linear's weight."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        packed = self._packed if self._pack_made else self.packed()
        if (
            packed is not None
            and x.dim() == 2
            and x.shape[0]
            and x.shape[1] == self.in_features
            and x.dtype == torch.float32
            and x.is_cpu
            and not x.requires_grad
        ):  # a decode step's (rows, in) input: straight to the kernel (a step makes ~70 of these calls)
            return _linear_dynamic()(x, packed, REDUCE_RANGE)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "Int8Linear is for inference and has no gradients: train the float model, then quantize it "
                "(or run under torch.no_grad())"
            )
        return int8_linear(x, self.qweight, self.scale, self.bias, packed=packed)

    def packed(self) -> object | None:
        """The fbgemm packed weight of the current buffers (made now if needed), or None: the reference runs."""
        if not self._pack_made:
            self.__dict__.update(_packed=pack_int8(self.qweight, self.scale, self.bias), _pack_made=True)
        return self._packed

    def repack(self) -> None:
        """Drop the packed weight: the next call packs the buffers as they are then."""
        self.__dict__.update(_packed=None, _pack_made=False)

    def __setattr__(self, name: str, value) -> None:
        if name in ("qweight", "scale", "bias"):
            self.repack()  # a new buffer: the packed copy is of the old one
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        self.repack()  # .to(), .cpu(), .float(), ...: the buffers are new tensors
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.repack()  # load_state_dict copies into the same buffers: the packed copy is stale
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        return {**self.__dict__, "_packed": None, "_pack_made": False}  # copies pack their own weight when used

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
