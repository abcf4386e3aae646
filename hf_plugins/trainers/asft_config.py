"""Configuration of `ASFTTrainer` (Anchored SFT)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..losses.asft import check_kl_coef
from .fused_sft_config import FusedSFTConfig


@dataclass
class ASFTConfig(FusedSFTConfig):
    r"""
    Configuration class for [`ASFTTrainer`]: every argument of [`FusedSFTConfig`] (and so of TRL's `SFTConfig`), plus
    the anchor of Anchored SFT ([arXiv 2509.23753](https://huggingface.co/papers/2509.23753)). The loss at each
    supervised token is DFT's probability-weighted NLL plus `kl_coef` times KL(reference || policy) over the full
    vocabulary, where the reference is the frozen starting model.

    Parameters:
        > Parameters that control the loss

        kl_coef (`float`, *optional*, defaults to `0.05`):
            Weight λ of the KL anchor, >= 0. `0` gives exactly DFT (`loss_type="dft"` of `FusedSFTConfig`). The
            official code defaults to `0.1` and its README recommends `0.03` when the logits stay in bf16/fp16,
            because a larger λ amplifies the precision noise of the KL. This library always computes the KL in
            float32 (float64 for float64 inputs), so that concern does not apply; `0.05` is the value of the paper's
            experiments (§5.1) and of the ASFT recipe contributed to LLaMA-Factory for Qwen2.5-7B on math.

        > Parameters that control the reference model

        ref_model (`str` or `None`, *optional*, defaults to `None`):
            Path or Hub id of the reference model, loaded frozen (eval mode, no gradients). `None` uses the starting
            model itself: with PEFT, the same model with its adapters disabled (no extra memory); with full
            fine-tuning, a frozen copy of the model made before training. The `ref_model` argument of the trainer
            (a path or a model) does the same and takes precedence.
        ref_model_init_kwargs (`dict[str, Any]` or `None`, *optional*, defaults to `None`):
            Keyword arguments for `from_pretrained` when the reference model is loaded from a path (as TRL's
            `model_init_kwargs`; a JSON string is accepted on the command line). `dtype` defaults to the policy's.

    `loss_type` keeps its default (`"nll"`): ASFT's loss is its own, and the DFT term is part of it.
    """

    _VALID_DICT_FIELDS = FusedSFTConfig._VALID_DICT_FIELDS + ["ref_model_init_kwargs"]

    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "Weight of the KL(reference || policy) anchor, >= 0 (0 gives DFT). The official code uses 0.1 "
            "and recommends 0.03 for bf16 logits; the KL here is always computed in float32."
        },
    )
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub id of the frozen reference model. None: the starting model (adapters disabled with "
            "PEFT, a frozen copy with full fine-tuning)."
        },
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when loading `ref_model` from a path (dtype defaults "
            "to the policy's)."
        },
    )

    #: ASFT's loss is its own: only the default `loss_type` is accepted
    _loss_types = ("nll",)
    _loss_type_replaced_by = (
        "ASFT's loss (DFT + `kl_coef` x KL to the reference) replaces it. Leave `loss_type` at its default, and set "
        "`kl_coef=0` for plain DFT."
    )

    def __post_init__(self):
        super().__post_init__()
        try:
            self.kl_coef = check_kl_coef(self.kl_coef)
        except ValueError as error:
            raise ValueError(f"`kl_coef={self.kl_coef!r}` is invalid: {error}") from None
        if self.ref_model is not None and (not isinstance(self.ref_model, str) or not self.ref_model):
            raise ValueError(
                f"`ref_model={self.ref_model!r}` must be a path or Hub id (pass a model object to `ASFTTrainer` "
                "as `ref_model=` instead)."
            )
        if self.ref_model_init_kwargs is not None and not isinstance(self.ref_model_init_kwargs, dict):
            raise ValueError(
                "`ref_model_init_kwargs` must be a dict (or a JSON object string), got "
                f"{self.ref_model_init_kwargs!r}."
            )
