"""Data plumbing: collators that keep a method's extra columns."""

from .collator import DataCollatorWithExtraColumns

__all__ = ["DataCollatorWithExtraColumns"]
