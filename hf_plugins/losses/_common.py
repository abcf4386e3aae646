"""Helpers shared by the functional losses: the reduction convention and label checks."""

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
