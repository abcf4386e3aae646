"""Trainer/config pairs, one per method, all drop-in subclasses of TRL's `SFTTrainer` / `SFTConfig`."""

from .fused_sft_config import FusedSFTConfig
from .fused_sft_trainer import FusedSFTTrainer

__all__ = ["FusedSFTConfig", "FusedSFTTrainer"]
