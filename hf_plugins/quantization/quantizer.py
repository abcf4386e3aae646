"""Round-to-nearest fake quantisers with a straight-through estimator (STE).

A quantiser is described by a `QuantSpec` (bits, symmetric or not, clip ratio). Ranges are always taken along the
last dimension of the tensor, so the granularity is chosen by the layout of what is passed in:

- a weight `[out, in]` is quantised per output channel (one scale per row);
- a linear input `[..., in]` is quantised per token;
- a key/value tensor `[B, heads, T, head_dim]` is quantised per token and per head.

Formulas (`b` bits, clip ratio `γ` in (0, 1], ranges over the last dimension):

- symmetric:  `s = γ max|x| / (2^(b-1) - 1)`,  `Q(x) = s * clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)`
- asymmetric: the range is widened to include 0 (`lo = min(min x, 0)`, `hi = max(max x, 0)`),
  `s = γ (hi - lo) / (2^b - 1)`, `z = round(-γ lo / s)`,  `Q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)`

A row of zeros gets the scale 1 and quantises to zeros. The arithmetic is done in float32 (float64 for float64
inputs) and the result is cast back to the input's dtype. `bits >= 16` turns the quantiser off (the identity).

The STE passes the gradient through unchanged: `dL/dx := dL/dQ(x)`, including at clipped entries, and no gradient
flows to the scale or the zero point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..utils import is_integer

#: Bits at or above which a quantiser is the identity
OFF_BITS = 16
MIN_BITS = 2


def check_bits(bits, name: str = "bits") -> int:
    """`bits` as an int in [2, 16] (16 = quantisation off), or a `ValueError` naming `name`."""
    if not is_integer(bits) or not MIN_BITS <= bits <= OFF_BITS:
        raise ValueError(
            f"`{name}={bits!r}` is out of range: use an integer number of bits from {MIN_BITS} to {OFF_BITS} "
            f"({OFF_BITS} turns that quantiser off)."
        )
    return bits


def check_clip_ratio(clip_ratio, name: str = "clip_ratio") -> float:
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"`{name}={clip_ratio!r}` must be a number in (0, 1] (1.0 = no clipping).")
    return float(clip_ratio)


@dataclass(frozen=True)
class QuantSpec:
    """One fake quantiser: `bits` (2..16, 16 = off), `symmetric`, `clip_ratio` in (0, 1]."""

    bits: int = 4
    symmetric: bool = True
    clip_ratio: float = 1.0

    def __post_init__(self):
        check_bits(self.bits)
        check_clip_ratio(self.clip_ratio)

    @property
    def enabled(self) -> bool:
        return self.bits < OFF_BITS

    @property
    def code_range(self) -> tuple[int, int]:
        """The lowest and highest integer code: `[-2^(b-1), 2^(b-1) - 1]` symmetric, `[0, 2^b - 1]` asymmetric."""
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def quantize_to_grid(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The integer codes of `x` on `spec`'s grid, with the scale (and zero point for asymmetric), ranges over the last
    dimension. Returns `(codes, scale, zero)`: `codes` are whole numbers stored as floats of the compute dtype (in
    `[-2^(b-1), 2^(b-1)-1]` symmetric, `[0, 2^b-1]` asymmetric), `scale` and `zero` have a trailing dimension of 1,
    `zero` is None for symmetric. `dequantize(codes, scale, zero)` is `fake_quantize_values(x, spec)`.

    Divisions are tensor by tensor: on CUDA, torch divides by a Python number as a multiplication by its reciprocal,
    one ulp away from IEEE division, which would make the scales (and the Triton kernel's agreement) device-dependent.
    """
    if not spec.enabled:
        raise ValueError("quantize_to_grid needs bits < 16 (16 bits means no quantisation).")
    xf = x.to(_compute_dtype(x))
    qmin, qmax = spec.code_range
    if spec.symmetric:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        scale = (spec.clip_ratio * amax) / torch.full_like(amax, qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(xf / scale), qmin, qmax)
        return codes, scale, None
    lo = torch.clamp(xf.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(xf.amax(dim=-1, keepdim=True), min=0.0)
    scale = (spec.clip_ratio * (hi - lo)) / torch.full_like(hi, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-spec.clip_ratio * lo / scale)
    codes = torch.clamp(torch.round(xf / scale) + zero, qmin, qmax)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype=None) -> torch.Tensor:
    """`scale * (codes - zero)` in the scale's dtype, cast to `dtype` (default: the scale's)."""
    codes = codes.to(scale.dtype)
    values = scale * (codes - zero.to(scale.dtype)) if zero is not None else scale * codes
    return values.to(dtype or scale.dtype)


def fake_quantize_values(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`Q(x)` with no gradient rule; same dtype as `x`. The identity when `spec` is off. CUDA tensors in float32,
    bf16 or fp16 go through the fused Triton kernel (`hf_plugins.quantization.fake_quant_kernel`, the same values bit for
    bit); everything else through `fake_quantize_values_reference`."""
    if not spec.enabled:
        return x
    if use_fake_quant_kernel(x):
        from .fake_quant_kernel import fake_quantize_rows

        return fake_quantize_rows(x, spec)
    return fake_quantize_values_reference(x, spec)


def fake_quantize_values_reference(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`Q(x)` in plain torch ops (the reference of the Triton kernel)."""
    if not spec.enabled:
        return x
    codes, scale, zero = quantize_to_grid(x, spec)
    return dequantize(codes, scale, zero, dtype=x.dtype)


#: Set to False to run the torch reference on CUDA too
USE_TRITON_KERNEL = True
#: The dtypes the Triton kernel reads and writes
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_fake_quant_kernel(x: torch.Tensor) -> bool:
    """Whether `fake_quantize_values(x, ...)` takes the Triton kernel: a CUDA float32/bf16/fp16 tensor, with triton."""
    if not (USE_TRITON_KERNEL and x.is_cuda and x.dtype in KERNEL_DTYPES):
        return False
    from ..utils import triton_usable

    return triton_usable(x.device)


class _STEFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        return fake_quantize_values(x, spec)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`Q(x)` in the forward, the identity in the backward (straight-through estimator). Off (returns `x` itself)
    when `spec.bits >= 16`."""
    if not spec.enabled:
        return x
    return _STEFakeQuantize.apply(x, spec)


def quantization_error(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`mean((Q(x) - x)^2)` in float32/float64 (0 when `spec` is off)."""
    if not spec.enabled:
        return torch.zeros((), dtype=_compute_dtype(x), device=x.device)
    xf = x.detach().to(_compute_dtype(x))
    return (fake_quantize_values(xf, spec) - xf).pow(2).mean()
