"""What describes a fake quantiser (`QuantSpec`, its checks) and the dtypes the Triton kernel handles: shared by the
torch quantisers (`hf_plugins.quantization.quantizer`, which dispatches to the kernel) and the kernel itself
(`hf_plugins.quantization.fake_quant_kernel`), so that neither imports the other for them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..utils import is_integer


#: Bits at or above which a quantiser is the identity
OFF_BITS = 16
MIN_BITS = 2

#: The dtypes the Triton kernel reads and writes
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
