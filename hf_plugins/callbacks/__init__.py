"""Trainer callbacks: state that a method keeps between steps (UDS selection state, HFT's frozen set) and edits of
the final model (a LiNeS-scaled copy). Their math lives in `hf_plugins.losses` (UDS's scores:
`hf_plugins.losses.uds`) and `hf_plugins.merging`."""

from .hft import HFTCallback, HFTSelection, HFTSelector, apply_hft
from .lines import LiNeSCallback
from .uds import SketchMemory, UDSCallback, UDSSettings


__all__ = [
    "LiNeSCallback",
    "HFTCallback",
    "HFTSelection",
    "HFTSelector",
    "SketchMemory",
    "UDSCallback",
    "UDSSettings",
    "apply_hft",
]
