"""Configuration of `TLGRPOTrainer` (TL-Training's reinforcement-learning stage, arXiv 2412.15495)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .grpo_config import FusedGRPOConfig


@dataclass
class TLGRPOConfig(FusedGRPOConfig):
    r"""
    Configuration class for [`TLGRPOTrainer`]: every argument of [`FusedGRPOConfig`] (so of TRL's `GRPOConfig`), plus
    where TL-Training's tool-call reward finds the gold call and how strictly it reads the predicted one. Every GRPO
    default is TRL's: the paper's PPO settings have no GRPO counterpart to copy (docs/methods/tl_training.md).

    Parameters:
        > Parameters that control the tool-call reward

        gold_call_column (`str`, *optional*, defaults to `"gold_call"`):
            Dataset column holding each row's correct call, as `name(key='value', ...)` text, a JSON string
            `{"name": ..., "arguments": {...}}` or such a dict. The declared tools are read from the `tools` column.
        strict_tool_parsing (`bool`, *optional*, defaults to `True`):
            The official rules: in the `name(...)` form only single-quoted values count, and a value must equal the
            gold one with the same type. `False` also reads double-quoted and bare values and compares values after
            normalisation (case, surrounding spaces, `"3"` == `3`); this library's option, not the paper's.
    """

    gold_call_column: str = field(
        default="gold_call",
        metadata={
            "help": "Dataset column of each row's correct call (`name(key='value')` text, a JSON string or a dict); "
            "the declared tools come from the `tools` column."
        },
    )
    strict_tool_parsing: bool = field(
        default=True,
        metadata={
            "help": "The official reward rules (single-quoted values only in `name(...)` calls, values equal with the "
            "same type). False also reads double-quoted and bare values and compares them normalised (ours)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.gold_call_column, str) or not self.gold_call_column.strip():
            raise ValueError(
                f"`gold_call_column={self.gold_call_column!r}` must name the dataset column of the gold calls, e.g. "
                "'gold_call'."
            )
        if self.gold_call_column == "tools":
            raise ValueError(
                "`gold_call_column='tools'` names the column of the declared tools: the gold calls need a column of "
                "their own, e.g. 'gold_call'."
            )
