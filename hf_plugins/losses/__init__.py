"""Functional losses on materialised logits (the readable definitions) and the target rules the fused head uses.

Conventions: `logits` [B, T, V] and `labels` [B, T] are aligned (`logits[b, t]` predicts `labels[b, t]`), label -100
is ignored, and the reduction is `sum / num_items_in_batch` when that is given, else the mean over supervised tokens
(PoFT: the mean over sequences; GRPO: TRL's reduction of each `loss_type`, `grpo_loss`).
"""

from ..ops.method import LossMethod
from .asft import ASFTMethod, asft_loss
from .dft import DFTMethod, dft_loss
from .grpo import GRPOMethod, GRPOStatistics, grpo_loss
from .otr import OTRMethod, otr_loss
from .poft import PoFTMethod, poft_loss
from .sft import SFTMethod, sft_loss
from .weighted import WeightedMethod, weighted_sft_loss


#: Methods the fused head knows by name. Later methods register here.
METHODS: dict[str, type[LossMethod]] = {
    SFTMethod.name: SFTMethod,
    DFTMethod.name: DFTMethod,
    WeightedMethod.name: WeightedMethod,
    OTRMethod.name: OTRMethod,
    ASFTMethod.name: ASFTMethod,
    PoFTMethod.name: PoFTMethod,
    GRPOMethod.name: GRPOMethod,
}

__all__ = [
    "METHODS",
    "ASFTMethod",
    "DFTMethod",
    "GRPOMethod",
    "GRPOStatistics",
    "OTRMethod",
    "PoFTMethod",
    "SFTMethod",
    "WeightedMethod",
    "asft_loss",
    "dft_loss",
    "grpo_loss",
    "otr_loss",
    "poft_loss",
    "sft_loss",
    "weighted_sft_loss",
]
