"""hf-plugins: drop-in TRL trainers for recent fine-tuning research, with loss heads that never build the logits."""

__version__ = "0.1.0.dev0"
