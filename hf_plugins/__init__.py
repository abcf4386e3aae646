"""hf-plugins: drop-in TRL trainers for recent fine-tuning research, with loss heads that never build the logits."""

import importlib

__version__ = "0.1.0.dev0"

# Public names and the submodule that defines each. Loaded on first use: the trainers import TRL and transformers
# (seconds), which the loss functions and ops do not need.
_EXPORTS = {
    "ASFTConfig": "trainers",
    "ASFTTrainer": "trainers",
    "FusedGRPOConfig": "trainers",
    "FusedGRPOTrainer": "trainers",
    "FusedSFTConfig": "trainers",
    "FusedSFTTrainer": "trainers",
    "OTRConfig": "trainers",
    "OTRTrainer": "trainers",
    "PoFTConfig": "trainers",
    "PoFTTrainer": "trainers",
    "RoSTEConfig": "trainers",
    "RoSTETrainer": "trainers",
    "TLConfig": "trainers",
    "TLTrainer": "trainers",
    "UDSConfig": "trainers",
    "UDSMixin": "trainers",
    "with_uds": "trainers",
    "UDSCallback": "callbacks",
    "asft_loss": "losses",
    "dft_loss": "losses",
    "grpo_loss": "losses",
    "otr_loss": "losses",
    "poft_loss": "losses",
    "sft_loss": "losses",
    "weighted_sft_loss": "losses",
    "fused_linear_loss": "ops",
    "score_with_aligned_models": "data",
    "classify_tool_call": "rewards",
    "tool_call_reward": "rewards",
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
