"""Packing with a method's extra columns, and the sequences of a packed batch as the loss head sees them.

TRL's `SFTTrainer` packs `input_ids` and `labels` alone: it drops every other column first, since its packer
(`trl.pack_dataset`) moves only list columns with one entry per token. A method's columns ride along as follows:

- per-token columns (TL-Training's `token_weights`) already have one entry per token: they are packed, and cut by
  `bfd`'s truncation, with their tokens;
- per-example columns (PoFT's `ref_score`) are first repeated over their example's tokens (`spread_over_tokens`), so
  that every packing strategy moves each value with the tokens it belongs to. The collator hands them on per token;
  `sequence_values` turns them back into one value per packed sequence.

Why one value per token rather than one per sequence (a list aligned with `seq_lengths`): TRL's packer accepts only
columns aligned with `input_ids`, so a per-token list goes through every strategy unchanged (`wrapped` too, which has
no `seq_lengths`), through truncation and through the collator's flattening and padding (`pad_to_multiple_of`) with
no bookkeeping of its own; and a sequence's value is read at the very positions whose sequence the loss head derives
from `position_ids`, so the two can never disagree on how many sequences a row holds (a one-token first sequence has
no position left after the next-token shift; each padding position starts a sequence of its own). The price is one
number per token in the packed dataset, next to the token ids it already stores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import pack_dataset
from trl.trainer.utils import global_then_local_main_first

from ..losses._common import sequence_ids


def spread_over_tokens(batch: Mapping[str, list], columns: Sequence[str]) -> dict[str, list]:
    """For a batched `datasets.map`: each example's value of every per-example column, repeated once per token."""
    lengths = [len(ids) for ids in batch["input_ids"]]
    spread = {}
    for name in columns:
        for value in batch[name]:
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(
                    f"Column `{name}` must hold one number per example to be packed, got {type(value).__name__} "
                    f"{value!r}. Give each example a single value, or set `packing=False`."
                )
        spread[name] = [[value] * length for value, length in zip(batch[name], lengths)]
    return spread


def pack_with_columns(dataset, args, token_columns: Sequence[str], example_columns: Sequence[str], dataset_name: str):
    """Pack a tokenized and labelled dataset (not truncated: packing truncates) as `SFTTrainer` packs it, same
    shuffles and strategy, keeping the method's per-token and per-example columns (spread over their tokens)."""
    if args.max_length is None:
        raise ValueError("When packing is enabled, `max_length` can't be `None`.")
    map_kwargs: dict[str, Any] = {}
    if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither `num_proc` nor `desc`
        map_kwargs["num_proc"] = args.dataset_num_proc
    with global_then_local_main_first():
        dataset = dataset.select_columns(["input_ids", "labels", *token_columns, *example_columns])
        if example_columns:
            described = dict(map_kwargs)
            if isinstance(dataset, Dataset):
                described["desc"] = f"Spreading {', '.join(example_columns)} over the tokens of {dataset_name} dataset"
            dataset = dataset.map(
                spread_over_tokens, batched=True, fn_kwargs={"columns": tuple(example_columns)}, **described
            )
        # The shuffles `SFTTrainer` makes, before packing and after, with the same seed
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Packing {dataset_name} dataset"
        dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset


def packed_position_ids(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The `position_ids` of a padding-free batch (no `attention_mask`: its rows hold several sequences), else None
    (a padded batch holds one sequence per row)."""
    if "attention_mask" in batch:
        return None
    return batch.get("position_ids")


def batch_sequences(batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    """The sequence of every next-token position of a collated batch: ids `[rows, T - 1]` aligned with
    `labels[:, 1:]` (what the loss head trains on), numbered in row-major order, and their count. One sequence per row
    in a padded batch (or a mapping with `labels` alone); in a padding-free one, a new sequence wherever the position
    does not follow the previous one, as the fused head finds them from `position_ids`
    (`hf_plugins.losses._common.sequence_ids`)."""
    labels = batch["labels"][:, 1:]
    position_ids = packed_position_ids(batch)
    return sequence_ids(labels, None if position_ids is None else position_ids[:, 1:].to(labels.device))


def sum_per_sequence(values: torch.Tensor, sequences: tuple[torch.Tensor, int]) -> torch.Tensor:
    """`[S]`: the sum over each sequence of `values` aligned with the next-token positions (`[rows, T - 1]`)."""
    ids, count = sequences
    totals = torch.zeros(count, dtype=values.dtype, device=values.device)
    return totals.index_add_(0, ids.reshape(-1).to(values.device), values.reshape(-1))


def any_per_sequence(flags: torch.Tensor, sequences: tuple[torch.Tensor, int]) -> torch.Tensor:
    """`[S]` bool: the sequences with a set flag, for `flags` aligned with the next-token positions `[rows, T - 1]`."""
    return sum_per_sequence(flags.long(), sequences) > 0


def sequence_values(values: torch.Tensor, batch: Mapping[str, Any], name: str) -> torch.Tensor:
    """One value per sequence of `batch` (`[S]`, in the order of `batch_sequences`) from a per-example column as the
    collator emits it: `[B]` for a padded batch (one sequence per row), or per token (`[rows, T]`, each token holding
    its sequence's value) for a padding-free one. Raises if a sequence's tokens disagree (the rows were not packed
    along sequence boundaries)."""
    if values.dim() == 1:
        return values
    ids, count = batch_sequences(batch)
    flat_ids = ids.reshape(-1).to(values.device)
    flat = values[:, 1:].reshape(-1).double()
    if "attention_mask" in batch:  # padded rows of packed examples: the padding's value is not the row's
        keep = batch["attention_mask"][:, 1:].reshape(-1).to(values.device).bool()
        flat_ids, flat = flat_ids[keep], flat[keep]
    zeros = torch.zeros(count, dtype=torch.float64, device=values.device)
    low = zeros.scatter_reduce(0, flat_ids, flat, "amin", include_self=False)
    high = zeros.scatter_reduce(0, flat_ids, flat, "amax", include_self=False)
    if not ((low == high) | (low.isnan() & high.isnan())).all():
        raise ValueError(
            f"Column `{name}` holds several values within one packed sequence: each sequence needs one. Pack with "
            "`packing_strategy='bfd'` (whole sequences), or let the trainer pack the dataset (`packing=True`)."
        )
    return low.to(values.dtype)
