"""Configuration of `OTRTrainer` (One-Token Rollout)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.otr import DEFAULT_NEGATIVE_REWARD, DEFAULT_NUM_SAMPLES, DEFAULT_TEMPERATURE, check_otr_settings
from ..utils import is_integer
from .fused_sft_config import FusedSFTConfig


#: Spellings of "no sampling, exact expectation" accepted for `num_samples` from a command line, where None cannot be
#: typed (a YAML config can say `num_samples: null`)
_EXACT_SPELLINGS = ("none", "null", "exact")


@dataclass
class OTRConfig(FusedSFTConfig):
    r"""
    Configuration class for [`OTRTrainer`]: every argument of [`FusedSFTConfig`] (so of TRL's `SFTConfig`), plus the
    hyperparameters of One-Token Rollout (OTR, arXiv 2509.26313). At each supervised token OTR samples `num_samples`
    tokens from the current policy at `temperature`, rewards the ground-truth token with 1 and any other with
    `negative_reward`, and minimises the REINFORCE surrogate `-(1/K) sum_k R_k log pi(a_k)` (untempered log-prob).

    Parameters:
        > Parameters that control the OTR loss

        num_samples (`int` or `None`, *optional*, defaults to `8`):
            K, tokens sampled per supervised position. `8` is the default of the third-party port this
            implementation follows; the paper's reviewers quote `256`. The sampling costs one cumulative sum over the
            vocabulary per token plus `K log V` for the draws, on top of the head's matmuls, so K=8 costs about what
            SFT costs and K=256 adds a visible share of the head's time on large vocabularies (see
            `benchmarks/otr_step.py`); the gradient noise falls like `1 / sqrt(K)`. `None` (on the command line:
            `none` or `exact`) trains on the exact expectation over the tempered policy instead, the K -> infinity
            limit: no sampling noise, at DFT's cost. This mode is this library's, not the paper's.
        temperature (`float`, *optional*, defaults to `1.2`):
            tau of the sampling policy `softmax(z / tau)`; the paper samples at tau > 1 (exact value unverified).
            At `temperature=1` the expected gradient is `(1 - negative_reward)` times DFT's.
        negative_reward (`float`, *optional*, defaults to `-0.1`):
            beta, the reward of a sampled token that is not the label; must be < 1. The paper reports that a slightly
            negative value beats 0 (exact value unverified).
        otr_seed (`int` or `None`, *optional*, defaults to `None`):
            Seed of the sampling generator; `None` uses `seed`. Each process adds its index, so data-parallel ranks
            draw independent samples. The generator's state is saved in every checkpoint, so a resumed run continues
            the same sample stream.

    The inherited `loss_type` must stay `"nll"`: the loss is OTR's.
    """

    num_samples: int | str | None = field(
        default=DEFAULT_NUM_SAMPLES,
        metadata={
            "help": "K, tokens sampled per supervised position (8: third-party port default; the paper's reviewers "
            "quote 256, costlier). 'none' or 'exact' (null in YAML): the exact expectation over the tempered policy, "
            "no sampling (this library's variant, not the paper's)."
        },
    )
    temperature: float = field(
        default=DEFAULT_TEMPERATURE,
        metadata={"help": "tau of the sampling policy softmax(z / tau); > 0 (the paper uses tau > 1)."},
    )
    negative_reward: float = field(
        default=DEFAULT_NEGATIVE_REWARD,
        metadata={"help": "beta, the reward of a sampled token that is not the label; must be < 1."},
    )
    otr_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the OTR sampling generator (plus the process index); None uses `seed`."},
    )

    _loss_types = ("nll",)

    def __post_init__(self):
        self.num_samples = _parse_num_samples(self.num_samples)
        check_otr_settings(self.num_samples, self.temperature, self.negative_reward)
        if self.otr_seed is not None and not is_integer(self.otr_seed):
            raise ValueError(f"`otr_seed` must be an integer or None (use `seed`), got {self.otr_seed!r}.")
        super().__post_init__()


def _parse_num_samples(value):
    """`num_samples` as given in Python, YAML or on a command line (where it arrives as a string)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in _EXACT_SPELLINGS:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"`num_samples={value!r}` must be a positive integer or one of {', '.join(_EXACT_SPELLINGS)} (exact "
            "expectation)."
        ) from None
