"""A collator that carries a method's extra columns through TRL's language-modeling collator.

TRL's `DataCollatorForLanguageModeling` emits only `input_ids`, `labels` and `attention_mask` (or the padding-free
keys). Methods that need more per batch (token weights, per-example scores, sample ids) declare their columns; this
wrapper takes them out of each example, lets TRL's collator do everything else, then pads the per-token columns
exactly like `input_ids` (right padding, or one flattened row when padding-free) and stacks the per-example ones.

When a row can hold several examples (padding-free batches, packed rows) a per-example column is emitted per token,
each token holding its example's value, padded and flattened like `input_ids`; `hf_plugins.data.packing.
sequence_values` turns it into one value per sequence (see that module for why this form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DataCollatorWithExtraColumns:
    """Wrap a collator so that extra columns survive it.

    Args:
        base_collator (`Callable`): the collator that builds the model inputs (TRL's language-modeling collator).
        token_columns (`dict[str, float]`): per-token columns (one value per `input_ids` entry) and the value their
            padding takes (e.g. `{"token_weights": 0.0}`).
        example_columns (`tuple[str, ...]`): per-example columns (one number per example), stacked into `[B]`; when
            rows hold several examples (`padding_free`, or packed rows whose values are already one per token), one
            value per token instead, shaped like `input_ids` (padding holds 0).
        padding_free (`bool`): whether `base_collator` flattens the batch into one row.
    """

    base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    token_columns: dict[str, float] = field(default_factory=dict)
    example_columns: tuple[str, ...] = ()
    padding_free: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extra_names = (*self.token_columns, *self.example_columns)
        for name in extra_names:
            if name not in examples[0]:
                raise ValueError(
                    f"The batch has no `{name}` column, which this trainer needs. Add it to the dataset (and keep "
                    f"`remove_unused_columns` from dropping it), or use a trainer that does not need it."
                )
        extras = [{name: example[name] for name in extra_names} for example in examples]
        batch = self.base_collator([{k: v for k, v in ex.items() if k not in extra_names} for ex in examples])

        length = batch["input_ids"].shape[1]
        for name, pad_value in self.token_columns.items():
            values = [torch.as_tensor(extra[name], dtype=torch.float32) for extra in extras]
            batch[name] = self._pad_like_input_ids(name, values, examples, float(pad_value), length)
        for name in self.example_columns:
            values = [torch.as_tensor(extra[name]) for extra in extras]
            # Scores become float32 like the model's loss inputs; ids (sample indices) stay integers
            values = [value.float() if value.is_floating_point() else value.long() for value in values]
            if self.padding_free or any(value.dim() > 0 for value in values):
                # Rows holding several examples: one value per token (packed rows bring them spread already)
                values = [
                    value.expand(len(example["input_ids"])) if value.dim() == 0 else value
                    for value, example in zip(values, examples)
                ]
                batch[name] = self._pad_like_input_ids(name, values, examples, 0, length)
            else:
                batch[name] = torch.stack(values)
        return batch

    def _pad_like_input_ids(self, name, values, examples, pad_value, length) -> torch.Tensor:
        """Per-token `values` right-padded with `pad_value` to the batch's length, or flattened into one row."""
        for value, example in zip(values, examples):
            if value.dim() != 1 or value.shape[0] != len(example["input_ids"]):
                raise ValueError(
                    f"Column `{name}` has {value.shape[0] if value.dim() else 'one'} entries for an example of "
                    f"{len(example['input_ids'])} tokens: per-token columns need one entry per token (truncate them "
                    "with `input_ids`)."
                )
        if self.padding_free:
            values = [torch.cat(values)]
        padded = torch.full((len(values), length), pad_value, dtype=values[0].dtype)
        for row, value in enumerate(values):
            padded[row, : value.shape[0]] = value
        return padded
