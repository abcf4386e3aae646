"""Token-weighted SFT: each supervised token's NLL scaled by a given non-negative weight, `w = c_t * one_hot(y)`.
Used by TL-Training (key-token weights) and anything else that weighs tokens from the data."""

from __future__ import annotations

import torch

from ..ops.method import Chunk, KernelSpec, KernelStats, LossMethod, Rows, Targets, label_targets
from ._common import label_log_probs, reduce_sum


def check_token_weights(token_weights: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise a `ValueError` unless `token_weights` is a float tensor shaped like `labels`, finite and >= 0."""
    if not isinstance(token_weights, torch.Tensor):
        raise ValueError("`token_weights` must be a tensor shaped like `labels`.")
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise ValueError(
            f"`token_weights` has shape {tuple(token_weights.shape)} but `labels` has shape {tuple(labels.shape)}: "
            "pass one weight per label position."
        )
    if not torch.isfinite(token_weights).all():
        raise ValueError("`token_weights` holds NaN or infinite values: every weight must be a finite number >= 0.")
    if (token_weights < 0).any():
        raise ValueError("`token_weights` holds negative values: every weight must be >= 0 (0 drops the token).")


def weighted_sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor, num_items_in_batch=None
) -> torch.Tensor:
    """`-sum_t c_t * log p_t(y_t)`, reduced like `sft_loss`.

    Args:
        token_weights (`torch.Tensor` of shape `[B, T]`): the weight `c_t >= 0` of each position (aligned with
            `labels`; ignored where the label is -100).
    """
    check_token_weights(token_weights, labels)
    logp, mask = label_log_probs(logits, labels)
    weights = token_weights.to(logp.dtype).masked_fill(~mask, 0.0)
    return reduce_sum(-(weights * logp).sum(), mask.sum(), num_items_in_batch)


class WeightedMethod(LossMethod):
    """Target rule of token-weighted SFT for the fused head (input: `token_weights`)."""

    name = "weighted"

    def prepare(self, rows: Rows, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if token_weights is None:
            raise ValueError("Method 'weighted' needs `token_weights`, a tensor shaped like `labels`.")
        check_token_weights(token_weights, rows.mask)
        return {"token_weights": rows.gather("token_weights", token_weights)}

    def targets(self, chunk: Chunk) -> Targets:
        return label_targets(chunk.labels, chunk.inputs["token_weights"].to(chunk.log_probs.dtype))

    def metrics(self, chunk: Chunk, targets: Targets) -> dict[str, torch.Tensor]:
        return {"token_weight": targets.value.squeeze(-1)}

    def kernel_spec(self, row_inputs) -> KernelSpec:
        return KernelSpec(label_weight=row_inputs["token_weights"])

    def kernel_metrics(self, stats: KernelStats, row_inputs) -> dict[str, torch.Tensor]:
        return {"token_weight": row_inputs["token_weights"]}
