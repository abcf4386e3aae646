"""Trainer/config pairs, one per method, drop-in subclasses of TRL's `SFTTrainer` / `SFTConfig` (and of
`GRPOTrainer` / `GRPOConfig` for GRPO); UDS online batch
selection as a mixin for any of them (`with_uds`), and HFT (Half Fine-Tuning) for any trainer (`with_hft`); `TRAINERS`, the registry of the methods."""

from .asft_config import ASFTConfig
from .asft_trainer import ASFTTrainer
from .fused_sft_config import FusedSFTConfig
from .fused_sft_trainer import FusedSFTTrainer
from .grpo_config import FusedGRPOConfig
from .grpo_trainer import FusedGRPOTrainer
from .hft_config import HFTConfig
from .hft_trainer import HFTMixin, with_hft
from .lfu_config import LfUConfig
from .lfu_trainer import LfUTrainer
from .mft_config import MFTConfig
from .mft_trainer import MFTTrainer
from .otr_config import OTRConfig
from .otr_trainer import OTRTrainer
from .poft_config import PoFTConfig
from .poft_trainer import PoFTTrainer
from .roste_config import RoSTEConfig
from .roste_trainer import RoSTETrainer
from .srppo_config import SRPPOConfig
from .srppo_trainer import SRPPOTrainer
from .tl_config import TLConfig
from .tl_grpo_config import TLGRPOConfig
from .tl_grpo_trainer import TLGRPOTrainer
from .tl_trainer import TLTrainer
from .truthrl_config import TruthRLConfig
from .truthrl_trainer import TruthRLTrainer
from .uds_config import UDSConfig
from .uds_trainer import UDSMixin, with_uds


#: The methods: `hf-plugins <command>` -> trainer class, whose `config_class` is its config and `description` its line
#: in `hf-plugins --help`. The command line, the demo, the top-level exports and the tests read it: a new method is
#: one more trainer here (CONTRIBUTING.md lists the rest).
TRAINERS = {
    trainer.command: trainer
    for trainer in (
        FusedSFTTrainer,
        ASFTTrainer,
        OTRTrainer,
        TLTrainer,
        PoFTTrainer,
        RoSTETrainer,
        MFTTrainer,
        LfUTrainer,
        FusedGRPOTrainer,
        SRPPOTrainer,
        TruthRLTrainer,
        TLGRPOTrainer,
    )
}

__all__ = [
    "ASFTConfig",
    "ASFTTrainer",
    "FusedGRPOConfig",
    "FusedGRPOTrainer",
    "FusedSFTConfig",
    "FusedSFTTrainer",
    "MFTConfig",
    "MFTTrainer",
    "LfUConfig",
    "LfUTrainer",
    "HFTConfig",
    "HFTMixin",
    "OTRConfig",
    "OTRTrainer",
    "PoFTConfig",
    "PoFTTrainer",
    "RoSTEConfig",
    "RoSTETrainer",
    "SRPPOConfig",
    "SRPPOTrainer",
    "TLConfig",
    "TLGRPOConfig",
    "TLGRPOTrainer",
    "TLTrainer",
    "TRAINERS",
    "TruthRLConfig",
    "TruthRLTrainer",
    "UDSConfig",
    "UDSMixin",
    "with_hft",
    "with_uds",
]
