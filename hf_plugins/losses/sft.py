"""Plain SFT: cross-entropy on the label, `w = one_hot(y)`."""

from __future__ import annotations

import torch

from ..ops.method import Chunk, KernelSpec, LossMethod, Targets, label_targets
from ._common import label_log_probs, reduce_sum


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Negative log-likelihood of the labels.

    Args:
        logits (`torch.Tensor` of shape `[B, T, V]`): aligned with `labels` (`logits[b, t]` predicts `labels[b, t]`).
        labels (`torch.LongTensor` of shape `[B, T]`): token ids, -100 where no loss is taken.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this count (the global
            number of supervised tokens under gradient accumulation); default: the mean over supervised tokens.
    """
    logp, mask = label_log_probs(logits, labels)
    return reduce_sum(-logp.sum(), mask.sum(), num_items_in_batch)


class SFTMethod(LossMethod):
    """Target rule of plain SFT for the fused head."""

    name = "sft"

    def targets(self, chunk: Chunk) -> Targets:
        return label_targets(chunk.labels, torch.ones_like(chunk.label_log_probs))

    def kernel_spec(self, row_inputs) -> KernelSpec:
        return KernelSpec()
