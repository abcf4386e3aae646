"""Data plumbing: collators that keep a method's extra columns, tool-call tagging and tool-call prompts for
TL-Training, and aligned-model scoring for PoFT."""

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
from .tool_prompts import render_tool_prompt


__all__ = [
    "DEFAULT_ERROR_PATTERNS",
    "DataCollatorWithExtraColumns",
    "declared_tools",
    "is_error_response",
    "key_token_indices",
    "mae_trained_turns",
    "render_tool_prompt",
    "score_with_aligned_models",
    "tokenize_tool_conversation",
]
