"""LiNeS, layer-increasing network scaling (Wang et al., ICLR 2025, arXiv 2410.17146; official code:
wang-kee/LiNeS, `src/eval/eval.py` `LiNeS_scaling`, `src/eval/aggregation.py`).

The fine-tuning update tau = theta_ft - theta_0 of block l in {0, ..., L-1} is scaled by
lambda(l) = alpha + beta * l / (L - 1): shallow blocks move back toward the base, deep blocks keep their update.
Parameters outside the blocks (embeddings, final norm, lm_head) get alpha, as in the official code, or the factor
`outside`. Single task: beta = 1 - alpha (the last block keeps its whole update). Multi-task (`finetuned` merged from
several task fine-tunes): alpha = ||sum_t tau_t||_1 / (T ||tau_merged||_1), 1/T for task arithmetic, with beta tuned.

A LoRA update B A scaled by lambda is the adapter with B scaled by lambda, so adapters are edited without their base
weights (the base is read only for its layer count and to check that the adapter fits it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..utils import is_real
from .checkpoint import (
    DEFAULT_LAYER_PATTERN,
    Checkpoint,
    MergeError,
    check_adapter_fits,
    check_compatible,
    count_layers,
    layer_index,
    lora_factor,
    non_lora_tensors,
)
from .stream import stream_merge
from .writer import check_output


def lines_factors(alpha: float, beta: float, num_layers: int) -> list[float]:
    """lambda(l) = alpha + beta * l / (L - 1) for l = 0, ..., L - 1 (one block: alpha + beta)."""
    return [alpha + beta * (layer / (num_layers - 1) if num_layers > 1 else 1.0) for layer in range(num_layers)]


def norm_ratio_alpha(base, merged, tasks: Sequence) -> float:
    """Multi-task alpha of the official code: ||sum_t tau_t||_1 / ||tau_merged||_1 / T, in float64."""
    base_ck = Checkpoint.open(base, "base")
    merged_ck = Checkpoint.open(merged, "finetuned")
    task_cks = [Checkpoint.open(path, f"task {i + 1}") for i, path in enumerate(tasks)]
    roles = ["finetuned", *[f"task {i + 1}" for i in range(len(tasks))]]
    check_compatible(base_ck, [merged_ck, *task_cks], roles)
    if base_ck.is_adapter:
        raise MergeError("alpha='norm_ratio' works on full models; merge the adapters into their base first")
    summed = merged_norm = 0.0
    for _, names in base_ck.shards():
        for name in names:
            theta_0 = base_ck.tensor(name).to(torch.float64)
            summed += sum(task.tensor(name).to(torch.float64) - theta_0 for task in task_cks).abs().sum().item()
            merged_norm += (merged_ck.tensor(name).to(torch.float64) - theta_0).abs().sum().item()
        for checkpoint in (base_ck, merged_ck, *task_cks):
            checkpoint.release()
    if merged_norm == 0:
        raise MergeError(f"finetuned {merged} equals the base: there is no update to scale")
    return summed / merged_norm / len(tasks)


def lines_scale(
    base,
    finetuned,
    alpha: float | str,
    beta: float | None = None,
    outside: str | float = "alpha",
    *,
    output_dir,
    tasks: Sequence | None = None,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    num_layers: int | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Scale a fine-tune's update layer by layer with LiNeS.

    Parameters:
        base (`str` or `os.PathLike`):
            Folder of the pretrained model the fine-tune started from.
        finetuned (`str` or `os.PathLike`):
            Folder of the fine-tuned model (same architecture as `base`) or of a LoRA adapter trained on `base`.
        alpha (`float` or `"norm_ratio"`):
            Factor of the first block, in [0, 1] (the paper sweeps 0.0, 0.1, ..., 1.0 on validation data).
            `"norm_ratio"` computes the multi-task alpha from `tasks` (`finetuned` is then their merge).
        beta (`float`, *optional*):
            Increase of the factor from the first block to the last; defaults to `1 - alpha` (single task, the last
            block keeps its whole update). Required with `alpha="norm_ratio"`.
        outside (`"alpha"` or `float`, *optional*, defaults to `"alpha"`):
            Factor of the parameters outside the blocks (embeddings, final norm, lm_head): alpha as in the official
            code, or a number in [0, 1] (1 keeps their whole update).
        output_dir (`str` or `os.PathLike`):
            Folder of the edited model (with the fine-tune's config and tokenizer).
        tasks (`list`, *optional*):
            The task fine-tunes merged into `finetuned`, for `alpha="norm_ratio"`.
        layer_pattern (`str`, *optional*):
            Regex whose first group is the block index of a parameter name; defaults to
            `DEFAULT_LAYER_PATTERN`, which matches `layers.<i>.` (Hugging Face decoders).
        num_layers (`int`, *optional*):
            Number of blocks L; defaults to the base config's `num_hidden_layers`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest output shard, as in `save_pretrained`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing output folder.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the shards.

    Returns:
        `Path`: the output folder (a full model, or an adapter when `finetuned` is one).
    """
    if alpha == "norm_ratio":
        if not tasks or beta is None:
            raise MergeError("alpha='norm_ratio' needs `tasks` (the merged task fine-tunes) and a `beta`")
    elif not is_real(alpha) or not 0.0 <= alpha <= 1.0:
        raise MergeError(f"alpha={alpha!r} must be a number in [0, 1] (or 'norm_ratio' with tasks)")
    if beta is not None and (not is_real(beta) or beta < 0):
        raise MergeError(f"beta={beta!r} must be a number >= 0 (default: 1 - alpha)")
    if outside != "alpha" and (not is_real(outside) or not 0.0 <= outside <= 1.0):
        raise MergeError(f"outside={outside!r} must be 'alpha' or a number in [0, 1]")
    base_ck, ft_ck = Checkpoint.open(base, "base"), Checkpoint.open(finetuned, "finetuned")
    if ft_ck.is_adapter:
        check_adapter_fits(ft_ck, base_ck, "finetuned", "base")
        if non_lora_tensors(ft_ck):
            raise MergeError(
                f"finetuned {finetuned}: the adapter holds full tensors ({non_lora_tensors(ft_ck)[0]}, from "
                "modules_to_save or trainable tokens), whose update needs the base weights; merge the adapter "
                "(`merge_and_unload`) and pass the full model"
            )
    else:
        check_compatible(base_ck, [ft_ck], ["finetuned"])
    layers = num_layers or count_layers(base_ck, layer_pattern)
    check_output(output_dir, overwrite)
    if alpha == "norm_ratio":
        alpha = norm_ratio_alpha(base, finetuned, tasks)
    beta = 1.0 - alpha if beta is None else beta
    factors = lines_factors(alpha, beta, layers)
    outside_factor = alpha if outside == "alpha" else float(outside)

    def factor(name: str) -> float:
        layer = layer_index(name, layer_pattern)
        if layer is None:
            return outside_factor
        if layer >= layers:
            raise MergeError(f"{name}: block {layer}, but num_layers is {layers}")
        return factors[layer]

    if ft_ck.is_adapter:

        def combine(name, tensors):
            (tensor,) = tensors
            lora = lora_factor(name)
            if lora[1] == "A":
                return tensor
            return (tensor.to(torch.float32) * factor(name)).to(tensor.dtype)

        inputs = [ft_ck]
    else:

        def combine(name, tensors):
            finetuned_tensor, base_tensor = tensors
            theta_0 = base_tensor.to(torch.float32)
            return (theta_0 + factor(name) * (finetuned_tensor.to(torch.float32) - theta_0)).to(finetuned_tensor.dtype)

        inputs = [ft_ck, base_ck]
    return stream_merge(
        inputs, combine, output_dir, ft_ck, None, max_shard_size, overwrite, f"LiNeS alpha={alpha:g}", progress
    )
