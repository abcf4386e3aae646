"""Configuration of `MFTTrainer` (Masked Thought Fine-Tuning)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.mft import (
    DEFAULT_MASK_RATE,
    DEFAULT_REPLACE_RATE,
    DEFAULT_WARMUP_RATIO,
    MASK_TOKEN,
    MASK_TOKENS,
    SCHEDULES,
    check_mft_settings,
)
from ..utils import is_integer
from .fused_sft_config import FusedSFTConfig


@dataclass
class MFTConfig(FusedSFTConfig):
    r"""
    Configuration class for [`MFTTrainer`]: every argument of [`FusedSFTConfig`] (so of TRL's `SFTConfig`), plus the
    hyperparameters of Masked Thought Fine-Tuning (MFT, arXiv 2403.02178). During training, a random share of the
    *input* tokens of each response (the positions whose label is not -100) is replaced by a mask token or a random
    token; the labels stay the original tokens, so the loss is SFT's next-token cross-entropy on corrupted inputs.
    Evaluation sees the clean inputs.

    Parameters:
        > Parameters that control the masking

        mask_rate (`float`, *optional*, defaults to `0.4`):
            p_max, the share of response tokens masked once the schedule has ramped up; in [0, 1). Each sequence
            with n response tokens masks k ~ Binomial(n, p) of them, chosen uniformly without replacement. `0.4` is
            the official GSM8K scripts' `max_mask_rate` (and the official argument default); the MATH script uses
            `0.2`, the MetaMath and MAmmoTH scripts a fixed `0.2`. `0` trains plain SFT.
        mask_rate_schedule (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: the main repository's schedule, updated every optimizer step,
            `p_t = min(p_max, p_max * t / (r * T + 1))` with t the optimizer steps already taken and T `max_steps`
            (so the first step masks nothing); `"constant"`: `p_t = mask_rate` from the first step.
        mask_rate_warmup_ratio (`float`, *optional*, defaults to `2/3`):
            r, the share of the training steps over which the linear schedule ramps up; in (0, 1]. The official
            default (`mask_rate_warmup_ratio=2/3`; the scripts pass 0.66).
        replace_rate (`float`, *optional*, defaults to `1.0`):
            The probability that a masked position gets a token drawn uniformly from the tokenizer's base vocabulary
            (`tokenizer.vocab_size` ids) instead of the mask token. `1.0` is the official GSM8K recipe (`replace=True,
            replace_rate=1`, the paper's headline result); `0` always uses the mask token (the official MATH,
            MetaMath and MAmmoTH scripts).
        mask_token (`str`, *optional*, defaults to `"mask"`):
            The mask token, used where a masked position gets no random token (`replace_rate < 1`): `"mask"` adds
            a `<mask>` token to the tokenizer, its input and output embedding rows set to the mean of the existing
            rows (the official scripts), or uses the one the tokenizer has; `"pad"` uses the pad token (which the
            official README allows). A new `<mask>` token needs trainable embeddings, so it is refused with PEFT
            adapters: use `"pad"` or `replace_rate=1` there.
        mft_seed (`int` or `None`, *optional*, defaults to `None`):
            Seed of the masking generator; `None` uses `seed`. Each process adds its index, so data-parallel ranks
            mask different positions. The generator's state is saved in every checkpoint and restored on resume.
    """

    mask_rate: float = field(
        default=DEFAULT_MASK_RATE,
        metadata={
            "help": "p_max, the share of response tokens masked once the schedule has ramped up; in [0, 1) (0.4: the "
            "official GSM8K recipe; 0.2: MATH, MetaMath, MAmmoTH)."
        },
    )
    mask_rate_schedule: str = field(
        default="linear",
        metadata={
            "help": "'linear': p_t = min(p_max, p_max * t / (r * T + 1)) per optimizer step (official); 'constant': "
            "p_t = mask_rate.",
            "choices": list(SCHEDULES),
        },
    )
    mask_rate_warmup_ratio: float = field(
        default=DEFAULT_WARMUP_RATIO,
        metadata={
            "help": "r, the share of the steps over which the linear schedule ramps up; in (0, 1] (official 2/3)."
        },
    )
    replace_rate: float = field(
        default=DEFAULT_REPLACE_RATE,
        metadata={
            "help": "Probability that a masked position gets a uniformly random token instead of the mask token "
            "(1.0: official GSM8K recipe; 0: always the mask token)."
        },
    )
    mask_token: str = field(
        default="mask",
        metadata={
            "help": f"Where no random token is drawn: 'mask' (a {MASK_TOKEN} token, added with mean-initialised "
            "embedding rows; needs trainable embeddings, so not with PEFT) or 'pad' (the pad token).",
            "choices": list(MASK_TOKENS),
        },
    )
    mft_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the MFT masking generator (plus the process index); None uses `seed`."},
    )

    def __post_init__(self):
        check_mft_settings(
            self.mask_rate, self.mask_rate_schedule, self.mask_rate_warmup_ratio, self.replace_rate, self.mask_token
        )
        if self.mft_seed is not None and not is_integer(self.mft_seed):
            raise ValueError(f"`mft_seed={self.mft_seed!r}` must be an integer, or None to use `seed`.")
        super().__post_init__()

    @property
    def uses_mask_token(self) -> bool:
        """Whether some masked positions get the mask token (not every one a random token)."""
        return self.mask_rate > 0 and self.replace_rate < 1
