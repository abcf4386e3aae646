"""Configuration of `FusedGRPOTrainer`, TRL's `GRPOConfig` plus the choice of the fused loss head."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..ops.dispatch import BACKENDS
from .hub_config import HubConfigMixin


@dataclass
class FusedGRPOConfig(HubConfigMixin, GRPOConfig):
    r"""
    Configuration class for [`FusedGRPOTrainer`]: every argument of TRL's `GRPOConfig` (and so of
    `transformers.TrainingArguments`), plus the choice of the fused loss head that computes the policy loss from the
    hidden states, with its gradient, without building the `[tokens, vocab]` logits.

    Every `loss_type` of TRL (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) and every loss option
    (`importance_sampling_level`, `beta`, `use_bias_correction_kl`, `epsilon`, `epsilon_high`, `delta`, the SAPO and
    VESPO parameters, `off_policy_mask_threshold`, the vLLM importance-sampling correction,
    `mask_truncated_completions`, `entropy_coef` and adaptive entropy control) gives TRL's loss. Refused here, with
    the reason: `top_entropy_quantile < 1` and `loss_backend="liger"`.

    Parameters:
        > Parameters that control the loss head

        loss_backend (`str`, *optional*, defaults to `"auto"`):
            Backend of the fused linear loss head: `"auto"` (the fastest available: `"triton"` on a CUDA device,
            `"chunked"` elsewhere), `"chunked"` (pure torch, any device), `"triton"` (our Triton kernels between
            cuBLAS matmuls; CUDA) or `"reference"` (materialises the logits of the completion tokens; for debugging
            and tests only). `"liger"` is refused: Liger-Kernel's GRPO loss recomputes the logits in its backward.
        loss_chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Completion tokens per tile of the loss head. `None` picks the backend's default: about four million
            logits (at least 128 tokens) on `chunked`; about as many logits as the batch has hidden-state values on
            `triton`. Smaller tiles use less memory; larger tiles give the matmuls more work per call.
    """

    loss_backend: str = field(
        default="auto",
        metadata={
            "help": "Backend of the fused linear loss head: 'auto' (fastest on the device: 'triton' on CUDA, "
            "'chunked' elsewhere), 'chunked' (pure torch), 'triton' (our Triton kernels; CUDA) or 'reference' "
            "(materialises logits; for tests). 'liger' is not available for GRPO.",
            "choices": [name for name in BACKENDS if name != "liger"],
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Completion tokens per tile of the loss head. None picks the backend's default (chunked: about "
            "four million logits; triton: about as many logits as the batch has hidden-state values)."
        },
    )

    #: Of the two settings GRPOConfig derives from each other, the one the user set (None: both derived)
    _generation_setting = None

    def __post_init__(self):
        for name in ("generation_batch_size", "steps_per_generation"):
            if getattr(self, name) is not None:
                self._generation_setting = name
        super().__post_init__()
        if self.loss_backend == "liger":
            raise ValueError(
                "`loss_backend='liger'` is not available for GRPO: Liger-Kernel's GRPO loss recomputes the logits in "
                "its backward (four matmuls, against three here) and covers fewer options; use 'auto', 'triton' or "
                "'chunked'."
            )
        if self.loss_backend not in BACKENDS:
            raise ValueError(
                f"`loss_backend={self.loss_backend!r}` is not a loss backend: choose one of "
                f"{', '.join(repr(name) for name in BACKENDS if name != 'liger')}."
            )
        chunk = self.loss_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
            raise ValueError(
                f"`loss_chunk_size={self.loss_chunk_size!r}` must be a positive number of tokens, or None for the "
                "default."
            )
        if self.top_entropy_quantile < 1.0:
            raise ValueError(
                f"`top_entropy_quantile={self.top_entropy_quantile}` is not supported by the fused GRPO head: the "
                "entropy mask needs a quantile of every process's token entropies before any gradient, which the head "
                "computes in the same pass. Set `top_entropy_quantile=1.0`, or use TRL's GRPOTrainer."
            )

    def to_yaml_dict(self) -> dict:
        """As `HubConfigMixin.to_yaml_dict`, with only the one of `generation_batch_size` / `steps_per_generation`
        the user set (none when both were derived): `GRPOConfig` refuses both, and derives the other on the machine
        that loads the file, for its number of processes."""
        out = super().to_yaml_dict()
        for name in ("generation_batch_size", "steps_per_generation"):
            if name != self._generation_setting:
                out.pop(name, None)
        return out
