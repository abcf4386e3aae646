"""Trainer callbacks: state that a method keeps between steps (UDS selection state)."""

from .uds import (
    HeadFactors,
    SketchConstants,
    SketchMemory,
    UDSCallback,
    UDSSettings,
    head_factors,
    nuclear_norms_from_logits,
    scores_from_hidden,
    scores_from_hidden_softcapped,
    sketches_from_logits,
)

__all__ = [
    "HeadFactors",
    "SketchConstants",
    "SketchMemory",
    "UDSCallback",
    "UDSSettings",
    "head_factors",
    "nuclear_norms_from_logits",
    "scores_from_hidden",
    "scores_from_hidden_softcapped",
    "sketches_from_logits",
]
