"""Trainer callbacks: state that a method keeps between steps (UDS selection state) and edits of the final model
(a LiNeS-scaled copy). Their math lives in `hf_plugins.losses` (UDS's scores: `hf_plugins.losses.uds`) and
`hf_plugins.merging`."""

from .lines import LiNeSCallback
from .uds import SketchMemory, UDSCallback, UDSSettings


__all__ = [
    "LiNeSCallback",
    "SketchMemory",
    "UDSCallback",
    "UDSSettings",
]
