"""Configuration of `LfUTrainer` (Learning-from-the-Undesirable, arXiv 2511.13052)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..utils import is_integer
from .fused_sft_config import FusedSFTConfig


#: The official scripts' values (`run_lora.sh`: `alpha: 0.1`, `beta: 5`)
DEFAULT_LFU_ALPHA = 0.1
DEFAULT_LFU_LAMBDA = 5.0


@dataclass
class LfUConfig(FusedSFTConfig):
    r"""
    Configuration class for [`LfUTrainer`]: every argument of [`FusedSFTConfig`] (so of TRL's `SFTConfig`), plus the
    hyperparameters of Learning-from-the-Undesirable (LfU, arXiv 2511.13052), in its "consistency ascent" form (the
    official trainer `Lfu_consistency_asc_rep`). Each step takes the SFT gradient `g` of an independent minibatch
    B_B, moves the trainable parameters to `theta + lfu_alpha * g / ||g||` (a normalised gradient-ascent step, the
    "undesirable update"), and adds `lfu_lambda` times the mean squared distance between the hidden states of the
    training batch under that perturbed model and the (stop-gradient) clean ones, at the response positions.

    Parameters:
        > Parameters that control the LfU regulariser

        lfu_alpha (`float`, *optional*, defaults to `0.1`):
            Length of the ascent step, in parameter space (the perturbation is `lfu_alpha * g / ||g||`, `||g||` the
            global L2 norm over every trainable tensor). Must be > 0. The official scripts' `alpha`.
        lfu_lambda (`float`, *optional*, defaults to `5.0`):
            Weight of the consistency loss: `loss = L_SFT + lfu_lambda * L_cons`. Must be >= 0; `0` trains plain SFT
            (no extra forward is run). The official scripts' `beta`.
        lfu_layers (`list[int]` or `None`, *optional*, defaults to `None`):
            The hidden states compared, as indices of the model's `output_hidden_states` (0 is the embedding output,
            `num_hidden_layers` the final, normalised state); `L_cons` is the mean of their per-layer mean squared
            errors. `None`: all of them, `0 ... num_hidden_layers`, the official scripts' `start_layer: 0`,
            `finish_layer: 32` on a 32-layer model.
        lfu_seed (`int` or `None`, *optional*, defaults to `None`):
            Seed of the B_B stream, the second, independently shuffled pass over the training set that the ascent
            minibatches are drawn from; `None` uses `seed`. Its position is saved in every checkpoint, so a resumed
            run draws the B_B minibatches the uninterrupted run would have drawn.

    The inherited `loss_type` (`"nll"` or `"dft"`) is the SFT loss of both the training term and the ascent direction.
    """

    lfu_alpha: float = field(
        default=DEFAULT_LFU_ALPHA,
        metadata={
            "help": "Length of the normalised gradient-ascent perturbation alpha * g / ||g|| (> 0; official: 0.1)."
        },
    )
    lfu_lambda: float = field(
        default=DEFAULT_LFU_LAMBDA,
        metadata={"help": "Weight of the hidden-state consistency loss: L_SFT + lambda * L_cons (>= 0; official: 5)."},
    )
    lfu_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Indices of output_hidden_states compared by the consistency loss (0: embeddings, "
            "num_hidden_layers: the final normalised state). None: all of them (the official scripts' choice)."
        },
    )
    lfu_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the independently shuffled stream of ascent minibatches (B_B); None uses `seed`."},
    )

    def __post_init__(self):
        check_lfu_settings(self.lfu_alpha, self.lfu_lambda, self.lfu_layers, self.lfu_seed)
        if self.lfu_layers is not None:
            self.lfu_layers = [int(layer) for layer in self.lfu_layers]
        if self.fsdp:
            raise ValueError(
                f"`fsdp={self.fsdp!r}` cannot be used with LfUConfig: LfU perturbs the trainable parameters in place, "
                "which needs every parameter whole on every process. Train with DDP (no `fsdp`), with LoRA if the model "
                "does not fit."
            )
        super().__post_init__()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_lfu_settings(alpha, lam, layers, seed) -> None:
    """Raise a one-line `ValueError` naming the `lfu_*` field and the fix for any invalid value."""
    if not _is_number(alpha) or alpha <= 0:
        raise ValueError(
            f"`lfu_alpha={alpha!r}` must be a finite number > 0, the length of the ascent perturbation (the official "
            "scripts use 0.1). To train without LfU's regulariser set `lfu_lambda=0`."
        )
    if not _is_number(lam) or lam < 0:
        raise ValueError(
            f"`lfu_lambda={lam!r}` must be a finite number >= 0, the weight of the consistency loss (the official "
            "scripts use 5; 0 is plain SFT)."
        )
    if layers is not None:
        if isinstance(layers, (int, str)) or not all(is_integer(layer) for layer in layers) or not len(layers):
            raise ValueError(
                f"`lfu_layers={layers!r}` must be a non-empty list of hidden-state indices (0: embeddings, "
                "num_hidden_layers: the final state), or None for all of them."
            )
        if any(int(layer) < 0 for layer in layers) or len(set(map(int, layers))) != len(layers):
            raise ValueError(
                f"`lfu_layers={list(layers)!r}` must hold distinct indices >= 0 (0: embeddings, num_hidden_layers: "
                "the final state); negative indices are not accepted."
            )
    if seed is not None and not is_integer(seed):
        raise ValueError(f"`lfu_seed={seed!r}` must be an integer, or None to use `seed`.")
