"""DFT (Dynamic Fine-Tuning, arXiv 2508.05629): each token's NLL scaled by its detached probability,
`w = sg(p(y)) * one_hot(y)`."""

from __future__ import annotations

import torch

from ..ops.method import Chunk, KernelSpec, KernelStats, LossMethod, Targets, label_targets
from ._common import label_log_probs, reduce_sum


def dft_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """`-sum_t sg(p_t(y_t)) * log p_t(y_t)`, reduced like `sft_loss` (same argument conventions)."""
    logp, mask = label_log_probs(logits, labels)
    return reduce_sum(-(logp.detach().exp() * logp).sum(), mask.sum(), num_items_in_batch)


class DFTMethod(LossMethod):
    """Target rule of DFT for the fused head."""

    name = "dft"

    def targets(self, chunk: Chunk) -> Targets:
        return label_targets(chunk.labels, chunk.label_log_probs.exp())

    def metrics(self, chunk: Chunk, targets: Targets) -> dict[str, torch.Tensor]:
        return {"dft_weight": targets.value.squeeze(-1)}

    def kernel_spec(self, row_inputs) -> KernelSpec:
        return KernelSpec(dft=True)

    def kernel_metrics(self, stats: KernelStats, row_inputs) -> dict[str, torch.Tensor]:
        return {"dft_weight": stats.label_log_probs.exp()}
