"""Trainer callbacks: state that a method keeps between steps (UDS selection state). Their math lives in
`hf_plugins.losses` (UDS's scores: `hf_plugins.losses.uds`)."""

from .uds import SketchMemory, UDSCallback, UDSSettings


__all__ = [
    "SketchMemory",
    "UDSCallback",
    "UDSSettings",
]
