"""Reward functions for TRL's `GRPOTrainer`, usable as they are: `GRPOTrainer(reward_funcs=[tool_call_reward])`."""

from .tool_call import (
    TOOL_CALL_CATEGORIES,
    ParsedCall,
    classify_tool_call,
    make_tool_call_reward,
    parse_tool_call,
    tool_call_reward,
)


__all__ = [
    "TOOL_CALL_CATEGORIES",
    "ParsedCall",
    "classify_tool_call",
    "make_tool_call_reward",
    "parse_tool_call",
    "tool_call_reward",
]
