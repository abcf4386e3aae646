"""Configuration of `TruthRLTrainer`: `FusedGRPOConfig` plus the settings of TruthRL's truthfulness reward."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rewards.truthrl import DEFAULT_ABSTAIN_PHRASES, TRUTHRL_SCHEMES
from .grpo_config import FusedGRPOConfig


@dataclass
class TruthRLConfig(FusedGRPOConfig):
    r"""
    Configuration class for [`TruthRLTrainer`]: every argument of [`FusedGRPOConfig`] (and so of TRL's `GRPOConfig`),
    plus the settings of TruthRL's reward ([arXiv 2509.25760](https://huggingface.co/papers/2509.25760)), which
    the trainer builds with `hf_plugins.rewards.make_truthrl_reward`.

    Parameters:
        > Parameters that control the TruthRL reward

        truthrl_scheme (`str`, *optional*, defaults to `"ternary"`):
            `"ternary"` (TruthRL: correct +1, abstention 0, hallucination -1), `"binary"` (the vanilla-RL baseline:
            abstention -1), `"ternary_ook"` / `"binary_ook"` (abstaining on a question flagged out of the model's
            knowledge is +1, any answer to it -1).
        truthrl_answers_column (`str`, *optional*, defaults to `"answers"`):
            The dataset column of gold answers: a string or a list of strings per row.
        truthrl_ook_column (`str` or `None`, *optional*, defaults to `None`):
            The boolean column flagging out-of-knowledge questions, read by the `*_ook` schemes only (`None`:
            `"out_of_knowledge"`, the reference data's name).
        truthrl_abstain_phrases (`list[str]`, *optional*, defaults to `["i dont know"]`):
            An answer whose normalised text contains one of these (normalised too) is an abstention.
        truthrl_balanced_braces (`bool`, *optional*, defaults to `False`):
            Read `\boxed{...}` up to its matching brace; `False` stops at the first `}`, as the reference code does.
        truthrl_judge (`str` or `None`, *optional*, defaults to `None`):
            On the command line: the import path (`my_module.my_judge`) of a batched judge for answers that match no
            gold answer exactly (see `make_truthrl_reward`). `None`: exact match only, the reference code's offline
            `ternary_EM`. In Python, pass the callable as `TruthRLTrainer(..., judge=my_judge)`.

    `remove_unused_columns` must stay `False` (TRL's GRPO default): the reward reads the answers column.
    """

    truthrl_scheme: str = field(
        default="ternary",
        metadata={
            "help": "TruthRL reward: 'ternary' (correct +1, abstain 0, hallucination -1), 'binary' (abstain -1), "
            "'ternary_ook' / 'binary_ook' (abstaining on an out-of-knowledge question is +1).",
            "choices": list(TRUTHRL_SCHEMES),
        },
    )
    truthrl_answers_column: str = field(
        default="answers",
        metadata={"help": "Dataset column of the gold answers (a string or a list of strings per row)."},
    )
    truthrl_ook_column: str | None = field(
        default=None,
        metadata={
            "help": "Boolean column flagging out-of-knowledge questions, for the *_ook schemes (None: "
            "'out_of_knowledge')."
        },
    )
    truthrl_abstain_phrases: list[str] = field(
        default_factory=lambda: list(DEFAULT_ABSTAIN_PHRASES),
        metadata={"help": "Phrases that mark an abstention when the normalised answer contains one."},
    )
    truthrl_balanced_braces: bool = field(
        default=False,
        metadata={
            "help": "Read \\boxed{...} up to its matching brace (False: up to the first '}', as the reference)."
        },
    )
    truthrl_judge: str | None = field(
        default=None,
        metadata={
            "help": "Import path (my_module.my_judge) of a batched judge for answers that match no gold answer "
            "exactly; None: exact match only (offline)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.truthrl_scheme not in TRUTHRL_SCHEMES:
            raise ValueError(
                f"`truthrl_scheme={self.truthrl_scheme!r}` is not a TruthRL scheme: choose one of "
                f"{', '.join(TRUTHRL_SCHEMES)}."
            )
        if self.truthrl_ook_column is not None and not self.truthrl_scheme.endswith("_ook"):
            raise ValueError(
                f"`truthrl_ook_column={self.truthrl_ook_column!r}` is read only by the out-of-knowledge schemes: set "
                f"`truthrl_scheme='{self.truthrl_scheme}_ook'`, or drop `truthrl_ook_column`."
            )
        if isinstance(self.truthrl_abstain_phrases, str):
            self.truthrl_abstain_phrases = [self.truthrl_abstain_phrases]
        if not self.truthrl_answers_column:
            raise ValueError("`truthrl_answers_column` must name the dataset column of the gold answers.")
        if self.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns=True` drops the dataset's answers column, which the TruthRL reward reads: set "
                "`remove_unused_columns=False` (TRL's GRPO default)."
            )
