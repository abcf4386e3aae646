"""Reward functions for TRL's `GRPOTrainer`, usable as they are: `GRPOTrainer(reward_funcs=[tool_call_reward])`,
`GRPOTrainer(reward_funcs=[truthrl_reward])`."""

from .tool_call import (
    TOOL_CALL_CATEGORIES,
    ParsedCall,
    classify_tool_call,
    make_tool_call_reward,
    parse_tool_call,
    tool_call_reward,
)
from .truthrl import (
    DEFAULT_ABSTAIN_PHRASES,
    TRUTHRL_OUTCOMES,
    TRUTHRL_SCHEMES,
    TRUTHRL_SYSTEM_PROMPT,
    extract_boxed,
    make_truthrl_reward,
    normalize_answer,
    truthrl_outcome,
    truthrl_reward,
)


__all__ = [
    "DEFAULT_ABSTAIN_PHRASES",
    "TOOL_CALL_CATEGORIES",
    "TRUTHRL_OUTCOMES",
    "TRUTHRL_SCHEMES",
    "TRUTHRL_SYSTEM_PROMPT",
    "ParsedCall",
    "classify_tool_call",
    "extract_boxed",
    "make_tool_call_reward",
    "make_truthrl_reward",
    "normalize_answer",
    "parse_tool_call",
    "tool_call_reward",
    "truthrl_outcome",
    "truthrl_reward",
]
