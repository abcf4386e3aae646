"""Data plumbing: collators that keep a method's extra columns, tool-call tagging for TL-Training and aligned-model
scoring for PoFT."""

from .collator import DataCollatorWithExtraColumns
from .scoring import score_with_aligned_models
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
    "score_with_aligned_models",
    "tokenize_tool_conversation",
]
