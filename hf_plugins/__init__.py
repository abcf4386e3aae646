"""hf-plugins: drop-in TRL trainers for recent fine-tuning research, with loss heads that never build the logits."""

__version__ = "0.1.0.dev0"

from .losses import dft_loss, sft_loss, weighted_sft_loss
from .ops import fused_linear_loss
from .trainers import FusedSFTConfig, FusedSFTTrainer

__all__ = [
    "FusedSFTConfig",
    "FusedSFTTrainer",
    "__version__",
    "dft_loss",
    "fused_linear_loss",
    "sft_loss",
    "weighted_sft_loss",
]
