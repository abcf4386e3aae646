"""Trainer/config pairs, one per method, all drop-in subclasses of TRL's `SFTTrainer` / `SFTConfig`; UDS online batch
selection as a mixin for any of them (`with_uds`)."""

from .asft_config import ASFTConfig
from .asft_trainer import ASFTTrainer
from .fused_sft_config import FusedSFTConfig
from .fused_sft_trainer import FusedSFTTrainer
from .grpo_config import FusedGRPOConfig
from .grpo_trainer import FusedGRPOTrainer
from .otr_config import OTRConfig
from .otr_trainer import OTRTrainer
from .poft_config import PoFTConfig
from .poft_trainer import PoFTTrainer
from .roste_config import RoSTEConfig
from .roste_trainer import RoSTETrainer
from .tl_config import TLConfig
from .tl_trainer import TLTrainer
from .uds_config import UDSConfig
from .uds_trainer import UDSMixin, with_uds

__all__ = [
    "ASFTConfig",
    "ASFTTrainer",
    "FusedGRPOConfig",
    "FusedGRPOTrainer",
    "FusedSFTConfig",
    "FusedSFTTrainer",
    "OTRConfig",
    "OTRTrainer",
    "PoFTConfig",
    "PoFTTrainer",
    "RoSTEConfig",
    "RoSTETrainer",
    "TLConfig",
    "TLTrainer",
    "UDSConfig",
    "UDSMixin",
    "with_uds",
]
