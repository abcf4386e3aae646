"""Configuration of `FusedSFTTrainer`, the base of every trainer in this library."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..ops.dispatch import BACKENDS
from ..utils import is_integer
from .hub_config import HubConfigMixin


@dataclass
class FusedSFTConfig(HubConfigMixin, SFTConfig):
    r"""
    Configuration class for [`FusedSFTTrainer`]: every argument of TRL's `SFTConfig` (and so of
    `transformers.TrainingArguments`), plus the choice of the fused loss head that computes the loss from the hidden
    states without building the `[tokens, vocab]` logits.

    Parameters:
        > Parameters that control the loss head

        loss_backend (`str`, *optional*, defaults to `"auto"`):
            Backend of the fused linear loss head: `"auto"` (the fastest available: `"triton"` on a CUDA device,
            `"chunked"` elsewhere), `"chunked"` (pure torch, any device), `"triton"` (our Triton kernels between
            cuBLAS matmuls; CUDA), `"liger"` (Liger-Kernel's fused linear cross-entropy plus Liger's RMSNorm, RoPE
            and SwiGLU model patches; CUDA; `loss_type` "nll" and "dft" and token-weighted losses only) or
            `"reference"` (materialises the logits of the supervised tokens; for debugging and tests only).
        loss_chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Supervised tokens per tile of the loss head. `None` picks the backend's default: about four million
            logits (at least 128 tokens) on `chunked`; about as many logits as the batch has hidden-state values on
            `triton`. Smaller tiles use less memory; larger tiles give the matmuls more work per call.

    The inherited `loss_type` selects the loss: `"nll"` (cross-entropy, the default) or `"dft"` (Dynamic
    Fine-Tuning, each token's loss scaled by its detached probability).
    """

    loss_backend: str = field(
        default="auto",
        metadata={
            "help": "Backend of the fused linear loss head: 'auto' (fastest on the device: 'triton' on CUDA, "
            "'chunked' elsewhere), 'chunked' (pure torch), 'triton' (our Triton kernels; CUDA), 'liger' "
            "(Liger-Kernel's fused linear cross-entropy and model patches; CUDA) or 'reference' (materialises "
            "logits; for tests).",
            "choices": list(BACKENDS),
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Supervised tokens per tile of the loss head. None picks the backend's default (chunked: about "
            "four million logits; triton: about as many logits as the batch has hidden-state values)."
        },
    )

    #: `loss_type` values this config's trainer implements (method configs narrow or extend it)
    _loss_types = ("nll", "dft")
    #: For a method whose loss replaces `loss_type`: why, for the error on any value but the default
    _loss_type_replaced_by = None

    def __post_init__(self):
        # Checked before TRL's own post-init, which maps its deprecated alias "chunked_nll" to "nll"
        if self._loss_type_replaced_by and self.loss_type not in ("nll", "chunked_nll"):
            raise ValueError(
                f"`loss_type={self.loss_type!r}` cannot be combined with {type(self).__name__}: "
                f"{self._loss_type_replaced_by}"
            )
        super().__post_init__()
        if self.loss_type not in self._loss_types:
            raise ValueError(
                f"`loss_type={self.loss_type!r}` is not supported by {type(self).__name__}: choose one of "
                f"{', '.join(map(repr, self._loss_types))}."
            )
        if self.loss_backend not in BACKENDS:
            raise ValueError(
                f"`loss_backend={self.loss_backend!r}` is not a loss backend: choose one of "
                f"{', '.join(map(repr, BACKENDS))}."
            )
        if self.loss_chunk_size is not None and (not is_integer(self.loss_chunk_size) or self.loss_chunk_size <= 0):
            raise ValueError(
                f"`loss_chunk_size={self.loss_chunk_size!r}` must be a positive number of tokens, or None for the "
                "default."
            )
