"""Helpers shared by the functional losses: the reduction convention, label checks and the sequences of packed rows."""

from __future__ import annotations

import torch

from ..ops.method import IGNORE_INDEX


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed in float32 at least (float64 stays float64): bf16 softmaxes are too noisy to train on."""
    return torch.promote_types(dtype, torch.float32)


def check_labels(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Return the mask of supervised positions, raising if a label is neither -100 nor a token id in [0, V)."""
    mask = labels != IGNORE_INDEX
    if mask.any():
        supervised = labels[mask]
        low, high = int(supervised.min()), int(supervised.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"`labels` holds {bad}, outside the vocabulary [0, {vocab_size}): labels must be token ids or -100 "
                "(ignored). Check the tokenizer matches the model's lm_head."
            )
    return mask


def reduce_sum(total: torch.Tensor, num_supervised: int, num_items_in_batch=None) -> torch.Tensor:
    """`total / num_items_in_batch` when given (the global count under gradient accumulation and DDP), else the
    mean over the supervised tokens. A call without supervised tokens reduces to 0, never `0 / 0`."""
    if num_items_in_batch is None:
        return total / max(int(num_supervised), 1)
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(total.device, total.dtype).clamp(min=1)
    return total / max(num_items_in_batch, 1)


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position `log p(label)` in the compute dtype (0 where ignored) and the supervised mask."""
    mask = check_labels(labels, logits.shape[-1])
    log_probs = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    picked = log_probs.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~mask, 0.0), mask


def sequence_ids(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The sequence of every position (shaped like `labels`) and the number of sequences.

    Without `position_ids`, each row of `[B, T]` labels is one sequence (a flat `[N]` input is one sequence). With
    `position_ids` (shaped like `labels` and aligned with them: the position, within its own sequence, of the token
    each label is), a packed row holds several sequences: a new one starts at the start of each row and wherever the
    position does not follow the previous one (`position_ids[t] != position_ids[t - 1] + 1`, e.g. back to 0).
    Sequences are numbered in row-major order.
    """
    if position_ids is None:
        if labels.dim() == 2:
            ids = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
            return ids, labels.shape[0]
        return torch.zeros_like(labels, dtype=torch.long), 1
    if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != tuple(labels.shape):
        shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(
            f"`position_ids` has shape {shape} but `labels` has shape {tuple(labels.shape)}: pass the position of "
            "every label's token in its own sequence, aligned with `labels` (shifted like them)."
        )
    if labels.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.long), 0
    positions = position_ids.to(labels.device).long().reshape(-1, labels.shape[-1])
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    ids = starts.reshape(-1).cumsum(0).reshape(labels.shape) - 1
    return ids, int(starts.sum())
