"""Triton kernel of RoSTE's round-to-nearest fake quantiser, ranges along the last dimension (one program per row).

Imported (with triton) only when `fake_quantize_values` gets a CUDA tensor. The torch reference
(`hf_plugins.quantization.quantizer`, `fake_quantize_values_reference`) makes about ten passes over the
tensor (upcast, abs, max, divide, round, clamp, multiply, downcast); this kernel reads each row once to find its
range and once more to write `Q(x)`, or only once when the row fits one block. It returns the same values bit for
bit: float32 arithmetic in the same order, IEEE division (`div_rn`), and round half to even.

Rounding: `(v + 1.5 * 2^23) - 1.5 * 2^23` rounds a float32 `|v| < 2^22` to the nearest integer, ties to even (the
addition's own rounding does it). `v` is first clamped to `±2^bits`, which changes no result (every code lies inside)
and keeps `|v|` small. The Triton interpreter has no `rint`, so this also runs the kernel under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import interpreter_enabled
from .spec import KERNEL_DTYPES, QuantSpec


#: Rows up to this length are held in registers in one block (one read of the row); longer rows take two reads
MAX_ONE_BLOCK = 8192
LOOP_BLOCK = 4096


@triton.jit
def _round_half_even(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_block(
    x, scale, zero, BOUND: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr
):
    v = tl.math.div_rn(x, scale)
    v = tl.minimum(tl.maximum(v, -BOUND), BOUND)
    if SYMMETRIC:
        codes = tl.minimum(tl.maximum(_round_half_even(v), QMIN), QMAX)
        return scale * codes
    codes = tl.minimum(tl.maximum(_round_half_even(v) + zero, QMIN), QMAX)
    return scale * (codes - zero)


@triton.jit
def fake_quantize_rows_kernel(
    x_ptr,
    out_ptr,
    params_ptr,
    n_cols,
    x_stride,
    out_stride,
    BOUND: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    out_row = out_ptr + row * out_stride
    clip = tl.load(params_ptr)
    offsets = tl.arange(0, BLOCK)

    # 1. the row's range (masked entries read as 0, which never changes it: the range always includes 0)
    if ONE_BLOCK:
        mask = offsets < n_cols
        x = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
        hi = tl.max(x, axis=0)
        lo = tl.min(x, axis=0)
    else:
        hi = tl.full((), 0.0, tl.float32)
        lo = tl.full((), 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            xb = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            hi = tl.maximum(hi, tl.max(xb, axis=0))
            lo = tl.minimum(lo, tl.min(xb, axis=0))

    # 2. scale and zero point, as the torch reference computes them
    if SYMMETRIC:
        scale = tl.math.div_rn(clip * tl.maximum(hi, -lo), QMAX)
        scale = tl.where(scale > 0, scale, 1.0)
        zero = 0.0
    else:
        lo = tl.minimum(lo, 0.0)
        hi = tl.maximum(hi, 0.0)
        scale = tl.math.div_rn(clip * (hi - lo), QMAX)
        scale = tl.where(scale > 0, scale, 1.0)
        zero = _round_half_even(tl.math.div_rn(-clip * lo, scale))

    # 3. Q(x), written in the output's dtype
    if ONE_BLOCK:
        y = _quantize_block(x, scale, zero, BOUND, QMIN, QMAX, SYMMETRIC)
        tl.store(out_row + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            cmask = cols < n_cols
            xb = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
            y = _quantize_block(xb, scale, zero, BOUND, QMIN, QMAX, SYMMETRIC)
            tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=cmask)


_clip_tensors: dict = {}


def _clip_tensor(clip_ratio: float, device: torch.device) -> torch.Tensor:
    """The clip ratio as a one-element float32 tensor on `device`, made once (not a host-to-device copy per call)."""
    key = (float(clip_ratio), str(device))
    if key not in _clip_tensors:
        _clip_tensors[key] = torch.tensor([clip_ratio], dtype=torch.float32, device=device)
    return _clip_tensors[key]


def fake_quantize_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`Q(x)` with ranges over the last dimension, in `x`'s dtype (float32, bfloat16 or float16); the same values as
    `fake_quantize_values_reference(x, spec)`. `spec` must be enabled (bits < 16)."""
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"fake_quantize_rows supports {KERNEL_DTYPES}, got {x.dtype}")
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols)
    if rows.numel() and rows.stride(-1) != 1:
        rows = rows.contiguous()
    # The Triton interpreter truncates float32 -> bf16 where the GPU rounds to nearest even: under the interpreter
    # (tests on CPU) the kernel writes float32 and torch rounds, so both give the GPU's values
    out_dtype = torch.float32 if x.dtype == torch.bfloat16 and interpreter_enabled() else x.dtype
    out = torch.empty((rows.shape[0], n_cols), dtype=out_dtype, device=x.device)
    if rows.shape[0] == 0 or n_cols == 0:
        return out.to(x.dtype).reshape(x.shape)
    qmin, qmax = spec.code_range
    one_block = n_cols <= MAX_ONE_BLOCK
    block = triton.next_power_of_2(n_cols) if one_block else LOOP_BLOCK
    params = _clip_tensor(spec.clip_ratio, x.device)
    fake_quantize_rows_kernel[(rows.shape[0],)](
        rows,
        out,
        params,
        n_cols,
        rows.stride(0),
        out.stride(0),
        BOUND=float(2**spec.bits),
        QMIN=float(qmin),
        QMAX=float(qmax),
        SYMMETRIC=spec.symmetric,
        BLOCK=block,
        ONE_BLOCK=one_block,
        num_warps=8 if block >= 4096 else 4 if block >= 1024 else 2,
    )
    return out.to(x.dtype).reshape(x.shape)
