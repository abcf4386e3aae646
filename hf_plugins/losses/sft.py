"""Plain SFT: cross-entropy on the label, `w = one_hot(y)`; with label smoothing `eps`,
`w = (1 - eps) * one_hot(y) + eps / V` (transformers' `LabelSmoother`, which TRL's SFTTrainer applies for
`label_smoothing_factor > 0`)."""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..ops.method import Chunk, KernelSpec, LossMethod, Rows, Targets, label_targets
from ._common import compute_dtype, label_log_probs, reduce_sum


def check_label_smoothing(label_smoothing) -> float:
    """Return `label_smoothing` as a float, raising a `ValueError` unless it is a number in [0, 1]."""
    if isinstance(label_smoothing, torch.Tensor) and label_smoothing.numel() == 1:
        label_smoothing = label_smoothing.item()
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real):
        raise ValueError(f"`label_smoothing` must be a number in [0, 1], got {label_smoothing!r}.")
    label_smoothing = float(label_smoothing)
    if not (math.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"`label_smoothing` must be a number in [0, 1] (0: none), got {label_smoothing}.")
    return label_smoothing


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Negative log-likelihood of the labels.

    Args:
        logits (`torch.Tensor` of shape `[B, T, V]`): aligned with `labels` (`logits[b, t]` predicts `labels[b, t]`).
        labels (`torch.LongTensor` of shape `[B, T]`): token ids, -100 where no loss is taken.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this count (the global
            number of supervised tokens under gradient accumulation); default: the mean over supervised tokens.
        label_smoothing (`float`, *optional*, defaults to 0): `eps`; each token's loss is then the cross-entropy
            against `(1 - eps) * one_hot(y) + eps / V`, `-(1 - eps) log p(y) - eps * mean_v log p(v)`, exactly
            transformers' `LabelSmoother` (the reduction above is its too).
    """
    eps = check_label_smoothing(label_smoothing)
    logp, mask = label_log_probs(logits, labels)
    total = -logp.sum()
    if eps:
        log_probs = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
        smoothed = -log_probs.mean(-1).masked_fill(~mask, 0.0).sum()
        total = (1.0 - eps) * total + eps * smoothed
    return reduce_sum(total, mask.sum(), num_items_in_batch)


class SFTMethod(LossMethod):
    """Target rule of plain SFT for the fused head. Input: `label_smoothing` (*optional*, a number in [0, 1])."""

    name = "sft"

    def prepare(self, rows: Rows, label_smoothing: float = 0.0, **unexpected) -> dict[str, torch.Tensor]:
        if unexpected:
            names = ", ".join(sorted(unexpected))
            raise ValueError(f"Method '{self.name}' takes no inputs other than `label_smoothing`, got: {names}.")
        eps = check_label_smoothing(label_smoothing)
        if not eps:
            return {}
        # One value per row, so that the chunks and the kernel read it like any per-row input
        return {"label_smoothing": torch.full(rows.labels.shape, eps, dtype=torch.float64, device=rows.labels.device)}

    def targets(self, chunk: Chunk) -> Targets:
        eps = chunk.inputs.get("label_smoothing")
        if eps is None:
            return label_targets(chunk.labels, torch.ones_like(chunk.label_log_probs))
        eps = eps.to(chunk.log_probs.dtype)
        targets = label_targets(chunk.labels, 1.0 - eps)
        targets.uniform_mass = eps
        return targets

    def kernel_spec(self, row_inputs) -> KernelSpec:
        eps = row_inputs.get("label_smoothing")
        if eps is None:
            return KernelSpec()
        return KernelSpec(label_weight=1.0 - eps, uniform_mass=eps)
