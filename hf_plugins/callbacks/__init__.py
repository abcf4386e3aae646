"""Trainer callbacks: state that a method keeps between steps (UDS selection state, HFT's frozen set). Their math
lives in `hf_plugins.losses` (UDS's scores: `hf_plugins.losses.uds`)."""

from .hft import HFTCallback, HFTSelection, HFTSelector, apply_hft
from .uds import SketchMemory, UDSCallback, UDSSettings


__all__ = [
    "HFTCallback",
    "HFTSelection",
    "HFTSelector",
    "SketchMemory",
    "UDSCallback",
    "UDSSettings",
    "apply_hft",
]
