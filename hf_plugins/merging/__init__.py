"""Weight-space tools for fine-tuned checkpoints, with no further training: model soups (uniform and greedy), LiNeS
layer scaling and fine-tuning transfer, for full models and LoRA adapters.

Every method streams safetensors shards (`stream.stream_merge`): inputs are checked against each other from their
file headers before anything is loaded, tensors are loaded one at a time, and the output is written into a temporary
folder renamed into place at the end. `hf-plugins merge soup|lines|transfer` runs them from the command line.
"""

from .checkpoint import DEFAULT_LAYER_PATTERN, Checkpoint, MergeError, layer_index
from .lines import lines_factors, lines_scale, norm_ratio_alpha
from .soups import GreedySoupResult, gather_ingredients, greedy_soup, load_for_eval, uniform_soup
from .transfer import transfer_finetuning


__all__ = [
    "DEFAULT_LAYER_PATTERN",
    "Checkpoint",
    "GreedySoupResult",
    "MergeError",
    "gather_ingredients",
    "greedy_soup",
    "layer_index",
    "lines_factors",
    "lines_scale",
    "load_for_eval",
    "norm_ratio_alpha",
    "transfer_finetuning",
    "uniform_soup",
]
