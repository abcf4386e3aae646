"""Configuration of `PoFTTrainer` (Preference-oriented SFT)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.poft import check_beta_gamma
from .fused_sft_config import FusedSFTConfig


TARGET_SCOPES = ("completion", "full")


@dataclass
class PoFTConfig(FusedSFTConfig):
    r"""
    Configuration class for [`PoFTTrainer`]: every argument of [`FusedSFTConfig`] (and so of TRL's `SFTConfig`), plus
    the settings of PoFT ([arXiv 2412.12865](https://huggingface.co/papers/2412.12865)). The loss of each sequence is
    `-log sigmoid(beta * (r_theta - ref_score) + gamma)`, with `r_theta` the policy's mean per-token log-prob of the
    response and `ref_score` the aligned models' score of it (a dataset column, computed once with
    `hf_plugins.score_with_aligned_models`); the batch loss is the mean over sequences.

    Parameters:
        > Parameters that control the loss

        beta (`float`, *optional*, defaults to `1.0`):
            Scale of the score difference inside the sigmoid, > 0. The paper has no such factor and the official code
            hard-codes 1.
        gamma (`float`, *optional*, defaults to `0.0`):
            Margin added inside the sigmoid. The official code hard-codes 0. A positive margin lowers every sequence's
            weight (the policy is asked to beat the aligned models by less); a negative one raises it.
        poft_target_scope (`str`, *optional*, defaults to `"completion"`):
            The tokens the policy's score `r_theta` averages over. `"completion"`: the supervised tokens TRL builds
            (the completion of prompt-completion data, the assistant turns of conversations with
            `assistant_only_loss=True`, which the trainer turns on for `messages` datasets), the same scope as the
            aligned models' scores. `"full"`: every non-padding token of the sequence, prompt included, which
            reproduces the official code (its collator labels the whole chat text while the aligned models score only
            the assistant content, so the two scores cover different tokens).
        assistant_only_loss (`bool` or `None`, *optional*, defaults to `None`):
            As in `SFTConfig`; `None` lets the trainer decide: on for a `messages` dataset under the `"completion"`
            scope (so the policy scores the assistant turns), off otherwise.

    `loss_type` keeps its default: PoFT's loss replaces it.
    """

    beta: float = field(
        default=1.0,
        metadata={"help": "Scale of the score difference inside the sigmoid, > 0 (1.0 in the official code)."},
    )
    gamma: float = field(
        default=0.0,
        metadata={"help": "Margin added inside the sigmoid (0.0 in the official code)."},
    )
    poft_target_scope: str = field(
        default="completion",
        metadata={
            "help": "Tokens r_theta averages over: 'completion' (the supervised response tokens, like the aligned "
            "models' scores) or 'full' (prompt + response, as the official code does).",
            "choices": list(TARGET_SCOPES),
        },
    )

    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "None (default): on for `messages` datasets under poft_target_scope='completion' (the policy "
            "scores the assistant turns, like the aligned models), off otherwise. True/False as in SFTConfig."
        },
    )

    _loss_types = ("nll",)
    _loss_type_replaced_by = (
        "PoFT's loss (-log sigmoid of the policy's score minus the aligned models') replaces it. Leave `loss_type` at "
        "its default."
    )

    def __post_init__(self):
        super().__post_init__()
        try:
            self.beta, self.gamma = check_beta_gamma(self.beta, self.gamma)
        except ValueError as error:
            raise ValueError(
                f"PoFTConfig: {error} Set `beta` > 0 and a finite `gamma` (defaults 1.0 and 0.0)."
            ) from None
        if self.poft_target_scope not in TARGET_SCOPES:
            raise ValueError(
                f"`poft_target_scope={self.poft_target_scope!r}` is not supported: choose 'completion' (the response "
                "tokens, the default) or 'full' (prompt + response, the official code's)."
            )
