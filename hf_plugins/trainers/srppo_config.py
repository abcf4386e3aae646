"""Configuration of `SRPPOTrainer` (Self-Rewarding PPO, arXiv 2510.21090)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .grpo_config import FusedGRPOConfig


#: How the log-ratio of a completion is reduced over its tokens: the paper's sum, or the per-token mean (ours)
SELF_REWARD_NORMALIZATIONS = ("sum", "mean")


@dataclass
class SRPPOConfig(FusedGRPOConfig):
    r"""
    Configuration class for [`SRPPOTrainer`]: every argument of [`FusedGRPOConfig`] (so of TRL's `GRPOConfig`), plus
    where Self-Rewarding PPO (SRPPO, arXiv 2510.21090) finds its two frozen models. The reward of a completion y of a
    prompt x is `log pi_SFT(y|x) - log pi_base(y|x)`, computed at temperature 1 whatever the sampling `temperature`.

    The two models come from one of two sources:

    - an SFT LoRA adapter (`sft_adapter_path`) on the base model passed as `model`: the policy trains a copy of the
      adapter, a frozen copy named `sft_adapter_name` gives pi_SFT and the adapters switched off give pi_base. No
      second model is loaded.
    - a full SFT checkpoint passed as `model` and the base model it was fine-tuned from (`base_model`), loaded as a
      second frozen model (its memory is logged). With a LoRA policy (`peft_config`) the adapters switched off give
      pi_SFT; with full fine-tuning a frozen copy of the SFT checkpoint does (TRL's reference model when `beta > 0`).

    Parameters:
        > Parameters that control the self-reward

        sft_adapter_path (`str` or `None`, *optional*, defaults to `None`):
            Folder (or Hub id) of the SFT LoRA adapter, trained on the base model passed as `model`. The policy
            starts from it (a trainable copy) and a frozen copy scores pi_SFT. Leave it `None` when `model` is
            already a `PeftModel` holding an adapter named `sft_adapter_name`.
        sft_adapter_name (`str`, *optional*, defaults to `"sft"`):
            Name of the frozen SFT adapter inside the policy's `PeftModel`.
        base_model (`str` or `None`, *optional*, defaults to `None`):
            Path (or Hub id) of the base model pi_base, loaded as a second frozen model, when `model` is a full SFT
            checkpoint. With an SFT adapter it may only name the policy's own base model (then nothing is loaded).
            It must share the SFT model's tokenizer.
        self_reward_normalization (`str`, *optional*, defaults to `"sum"`):
            `"sum"`: the paper's reward, the log-ratio summed over the completion's tokens. `"mean"`: divided by the
            completion's length, a per-token reward that does not grow with the length (this library's option,
            not the paper's).
    """

    sft_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder (or Hub id) of the SFT LoRA adapter on the base model given as the model: the policy "
            "trains a copy, a frozen copy scores pi_SFT, adapters off score pi_base. None when the model is a "
            "PeftModel that already holds the frozen SFT adapter, or with base_model."
        },
    )
    sft_adapter_name: str = field(
        default="sft",
        metadata={"help": "Name of the frozen SFT adapter inside the policy's PeftModel."},
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Path (or Hub id) of the base model pi_base, a second frozen model, when the model is a full SFT "
            "checkpoint (same tokenizer). With an SFT adapter it may only name the policy's own base model."
        },
    )
    self_reward_normalization: str = field(
        default="sum",
        metadata={
            "help": "'sum': the paper's reward, the log-ratio summed over the completion. 'mean': divided by the "
            "completion's length (this library's option, not the paper's).",
            "choices": list(SELF_REWARD_NORMALIZATIONS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.self_reward_normalization not in SELF_REWARD_NORMALIZATIONS:
            raise ValueError(
                f"`self_reward_normalization={self.self_reward_normalization!r}` is not a reduction of the "
                "self-reward: choose 'sum' (the paper's) or 'mean' (per token)."
            )
        if not isinstance(self.sft_adapter_name, str) or not self.sft_adapter_name:
            raise ValueError(f"`sft_adapter_name={self.sft_adapter_name!r}` must be a non-empty adapter name.")
        if self.sft_adapter_name in ("default", "ref"):
            raise ValueError(
                f"`sft_adapter_name={self.sft_adapter_name!r}` is taken: 'default' is the trained adapter and 'ref' "
                "TRL's reference copy of it; choose another name (the default is 'sft')."
            )
        for name in ("sft_adapter_path", "base_model"):
            if getattr(self, name) == "":
                setattr(self, name, None)
