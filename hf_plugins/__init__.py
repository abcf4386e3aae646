"""hf-plugins: drop-in TRL trainers for recent fine-tuning research, with loss heads that never build the logits."""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

#: The methods, readable without importing them (the trainers import TRL and transformers: seconds), for the exports
#: below and `hf-plugins --help`: command -> (config class, trainer class, one-line description). A copy of what
#: `hf_plugins.trainers.TRAINERS` holds, which tests/test_structure.py checks.
_TRAIN_COMMANDS = {
    "sft": (
        "FusedSFTConfig",
        "FusedSFTTrainer",
        "SFT (loss_type nll) or DFT (loss_type dft) with the fused loss head",
    ),
    "asft": ("ASFTConfig", "ASFTTrainer", "Anchored SFT: DFT plus a KL anchor to a frozen reference model"),
    "otr": ("OTRConfig", "OTRTrainer", "One-Token Rollout: a one-step policy gradient at every token"),
    "tl": ("TLConfig", "TLTrainer", "TL-Training: tool-call SFT with key-token weights and bad-call masking"),
    "poft": ("PoFTConfig", "PoFTTrainer", "Preference-oriented SFT against aligned models' scores (`ref_score`)"),
    "roste": ("RoSTEConfig", "RoSTETrainer", "RoSTE: rotated quantisation-aware SFT (W4A4KV4 fake quantisation)"),
    "mft": ("MFTConfig", "MFTTrainer", "Masked Thought: SFT on responses whose input tokens are partly masked"),
    "lfu": ("LfUConfig", "LfUTrainer", "LfU: SFT plus hidden-state consistency under a gradient-ascent perturbation"),
    "grpo": ("FusedGRPOConfig", "FusedGRPOTrainer", "GRPO, every TRL loss_type, with the fused policy-loss head"),
    "srppo": (
        "SRPPOConfig",
        "SRPPOTrainer",
        "Self-Rewarding PPO: the SFT/base log-ratio as the GRPO reward, on the fused head",
    ),
    "truthrl": (
        "TruthRLConfig",
        "TruthRLTrainer",
        "TruthRL: GRPO with the ternary truthfulness reward (correct +1, abstain 0, wrong -1)",
    ),
    "tl-grpo": (
        "TLGRPOConfig",
        "TLGRPOTrainer",
        "TL-Training's RL stage: GRPO with the tool-call category reward, on the fused head",
    ),
}

# Public names and the submodule that defines each. Loaded on first use: the trainers import TRL and transformers
# (seconds), which the loss functions and ops do not need.
_EXPORTS = {
    **{name: "trainers" for config, trainer, _ in _TRAIN_COMMANDS.values() for name in (config, trainer)},
    "UDSConfig": "trainers",
    "UDSMixin": "trainers",
    "with_uds": "trainers",
    "UDSCallback": "callbacks",
    "LiNeSCallback": "callbacks",
    "uniform_soup": "merging",
    "greedy_soup": "merging",
    "lines_scale": "merging",
    "transfer_finetuning": "merging",
    "HFTConfig": "trainers",
    "HFTMixin": "trainers",
    "with_hft": "trainers",
    "HFTCallback": "callbacks",
    "apply_hft": "callbacks",
    "asft_loss": "losses",
    "dft_loss": "losses",
    "grpo_loss": "losses",
    "otr_loss": "losses",
    "poft_loss": "losses",
    "sft_loss": "losses",
    "weighted_sft_loss": "losses",
    "fused_linear_loss": "ops",
    "score_with_aligned_models": "data",
    "compare": "comparison",
    "classify_tool_call": "rewards",
    "tool_call_reward": "rewards",
    "make_truthrl_reward": "rewards",
    "truthrl_reward": "rewards",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_plugins' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # the lazy exports, spelled out for type checkers and IDEs (tests/test_packaging.py keeps them true)
    from .callbacks import HFTCallback, LiNeSCallback, UDSCallback, apply_hft
    from .comparison import compare
    from .data import score_with_aligned_models
    from .losses import asft_loss, dft_loss, grpo_loss, otr_loss, poft_loss, sft_loss, weighted_sft_loss
    from .merging import greedy_soup, lines_scale, transfer_finetuning, uniform_soup
    from .ops import fused_linear_loss
    from .rewards import classify_tool_call, make_truthrl_reward, tool_call_reward, truthrl_reward
    from .trainers import (
        ASFTConfig,
        ASFTTrainer,
        FusedGRPOConfig,
        FusedGRPOTrainer,
        FusedSFTConfig,
        FusedSFTTrainer,
        HFTConfig,
        HFTMixin,
        LfUConfig,
        LfUTrainer,
        MFTConfig,
        MFTTrainer,
        OTRConfig,
        OTRTrainer,
        PoFTConfig,
        PoFTTrainer,
        RoSTEConfig,
        RoSTETrainer,
        SRPPOConfig,
        SRPPOTrainer,
        TLConfig,
        TLGRPOConfig,
        TLGRPOTrainer,
        TLTrainer,
        TruthRLConfig,
        TruthRLTrainer,
        UDSConfig,
        UDSMixin,
        with_hft,
        with_uds,
    )
