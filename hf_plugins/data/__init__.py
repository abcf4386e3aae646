"""Data plumbing: collators that keep a method's extra columns, and tool-call tagging for TL-Training."""

from .collator import DataCollatorWithExtraColumns
from .tool_calls import (
    DEFAULT_ERROR_PATTERNS,
    declared_tools,
    is_error_response,
    key_token_indices,
    mae_trained_turns,
    tokenize_tool_conversation,
)

__all__ = [
    "DEFAULT_ERROR_PATTERNS",
    "DataCollatorWithExtraColumns",
    "declared_tools",
    "is_error_response",
    "key_token_indices",
    "mae_trained_turns",
    "tokenize_tool_conversation",
]
