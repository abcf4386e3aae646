"""Model soups (Wortsman et al., 2022, arXiv 2203.05482; official code: mlfoundations/model-soups, `main.py`).

Uniform soup: the mean of the ingredients' weights, accumulated in float32. Greedy soup: ingredients sorted by their
own held-out score, each added to the soup only if the soup's held-out score strictly improves (the official code's
`>`). All ingredients must be fine-tuned from the same base.

LoRA adapters are souped without merging them into the base. The soup of the models `W + s_i B_i A_i` is
`W + (1/k) sum_i s_i B_i A_i`, which is exactly the LoRA adapter whose factors are the ingredients' stacked along
the rank: `A = [A_1; ...; A_k]`, `B = [s_1 B_1, ..., s_k B_k] / k`, with scaling 1. Its rank is the sum of the
ingredients' ranks, so adapters of different ranks soup too. (Averaging A and B separately would not be a soup:
mean(B) mean(A) is not mean(B A).)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils import get_logger
from .checkpoint import Checkpoint, MergeError, check_compatible, lora_factor
from .stream import stream_merge
from .writer import check_output


logger = get_logger(__name__)


def open_ingredients(paths: Sequence, role: str = "ingredient") -> list[Checkpoint]:
    """Open and cross-check soup ingredients (at least one; adapters may differ in rank)."""
    if not paths:
        raise MergeError("a soup needs at least one ingredient")
    checkpoints = [Checkpoint.open(path, f"{role} {i + 1}") for i, path in enumerate(paths)]
    check_compatible(
        checkpoints[0], checkpoints[1:], [f"{role} {i + 2}" for i in range(len(paths) - 1)], lora_ranks=True
    )
    return checkpoints


def uniform_soup(
    paths: Sequence,
    *,
    output_dir,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Average the weights of models (or LoRA adapters) fine-tuned from the same base.

    Parameters:
        paths (`list` of `str` or `os.PathLike`):
            Folders of the ingredients, saved with `save_pretrained` (safetensors): full models of one architecture
            or LoRA adapters of one base.
        output_dir (`str` or `os.PathLike`):
            Folder of the soup, with the first ingredient's config and tokenizer; refused if it exists and is not
            empty (unless `overwrite`).
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest output shard, as in `save_pretrained`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing output folder.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the shards.

    Returns:
        `Path`: the output folder; it loads with `AutoModelForCausalLM.from_pretrained` (an adapter with
        `PeftModel.from_pretrained`).
    """
    checkpoints = open_ingredients(paths)
    check_output(output_dir, overwrite)
    first, k = checkpoints[0], len(checkpoints)
    config_update = None
    if first.is_adapter:
        combine, config_update = _adapter_soup(checkpoints)
    else:

        def combine(name, tensors):
            total = tensors[0].to(torch.float32)
            for tensor in tensors[1:]:
                total += tensor.to(torch.float32)
            return (total / k).to(tensors[0].dtype)

    return stream_merge(
        checkpoints, combine, output_dir, first, config_update, max_shard_size, overwrite, "uniform soup", progress
    )


def _adapter_soup(checkpoints: list[Checkpoint]):
    """The combine function and adapter config of the exact soup of LoRA adapters (see the module docstring)."""
    k = len(checkpoints)
    ranks: dict[str, int] = {}
    for name in checkpoints[0].shapes:
        factor = lora_factor(name)
        if factor is not None and factor[1] == "A":
            ranks[factor[0]] = sum(checkpoint.shapes[name][0] for checkpoint in checkpoints)
    rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else checkpoints[0].config["r"]
    # scaling = lora_alpha / r = 1 for every module: the ingredients' own scalings are folded into B
    pattern = {module: module_rank for module, module_rank in ranks.items() if module_rank != rank}
    config_update = {"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": pattern}
    config_update["alpha_pattern"] = dict(pattern)

    def combine(name, tensors):
        factor = lora_factor(name)
        if factor is None:  # modules_to_save, trainable tokens: full tensors, averaged
            return (sum(tensor.to(torch.float32) for tensor in tensors) / k).to(tensors[0].dtype)
        module, which = factor
        if which == "A":
            return torch.cat(tensors, dim=0)
        scaled = [
            tensor.to(torch.float32) * (checkpoint.lora_scaling(module) / k)
            for tensor, checkpoint in zip(tensors, checkpoints)
        ]
        return torch.cat(scaled, dim=1).to(tensors[0].dtype)

    return combine, config_update


# ---------------------------------------------------------------------------------------------- greedy soup
@dataclass
class GreedySoupResult:
    """What [`greedy_soup`] did.

    Parameters:
        output_dir (`Path`): the soup.
        ingredients (`list[str]`): the ingredients in the soup, in the order they were added.
        scores (`dict[str, float]`): each ingredient's own held-out score.
        history (`list[dict]`): one entry per ingredient tried, in order: `ingredient`, `score` (of the soup with
            it), `best_before`, `accepted` and `soup_size` (after the decision).
        soup_score (`float`): the held-out score of the final soup.
    """

    output_dir: Path
    ingredients: list[str]
    scores: dict[str, float]
    history: list[dict] = field(default_factory=list)
    soup_score: float | None = None


def load_for_eval(path, base=None):
    """A saved model (or a LoRA adapter on its base: `base`, else the adapter's `base_model_name_or_path`) in eval
    mode, loaded by `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        return AutoModelForCausalLM.from_pretrained(path).eval()
    from peft import PeftModel

    base = base or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path).eval()


def greedy_soup(
    paths: Sequence,
    eval_fn: Callable,
    higher_is_better: bool = True,
    *,
    output_dir,
    scores: dict | None = None,
    base=None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> GreedySoupResult:
    """Greedy soup: add ingredients in the order of their own held-out score, keeping each one only if the soup's
    held-out score strictly improves.

    Parameters:
        paths (`list` of `str` or `os.PathLike`):
            Ingredient folders, as for [`uniform_soup`].
        eval_fn (`Callable[[PreTrainedModel], float]`):
            Held-out score of a model (never the test set): for example a wrapper of `Trainer.evaluate` returning
            `eval_loss` (then `higher_is_better=False`).
        output_dir (`str` or `os.PathLike`):
            Folder of the soup.
        higher_is_better (`bool`, *optional*, defaults to `True`):
            Whether a larger `eval_fn` value is better (accuracy) or a smaller one (loss).
        scores (`dict`, *optional*):
            The ingredients' own scores (path -> score), when known already (e.g. from each run's final
            evaluation): they are not evaluated again.
        base (`str`, *optional*):
            Base model of LoRA ingredients, used to evaluate them (defaults to the adapter's
            `base_model_name_or_path`).
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest output shard, as in `save_pretrained`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing output folder.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the shards.

    Returns:
        [`GreedySoupResult`]: the soup's folder, its ingredients, every ingredient's score and the history of the
        decisions (also logged).
    """
    paths = [str(path) for path in paths]
    open_ingredients(paths)
    check_output(output_dir, overwrite)
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    own = {}
    for path in paths:
        if scores is not None and path in scores:
            own[path] = float(scores[path])
        else:
            own[path] = float(eval_fn(load_for_eval(path, base)))
        logger.info(f"greedy soup: ingredient {path} scores {own[path]:.6g}")
    ordered = sorted(paths, key=lambda path: own[path], reverse=higher_is_better)  # stable: ties keep their order
    soup, best = [ordered[0]], own[ordered[0]]
    history = [{"ingredient": ordered[0], "score": best, "best_before": None, "accepted": True, "soup_size": 1}]
    work = Path(tempfile.mkdtemp(prefix=".greedy-soup-", dir=Path(output_dir).expanduser().absolute().parent))
    try:
        for i, path in enumerate(ordered[1:]):
            candidate = uniform_soup(
                [*soup, path], output_dir=work / f"candidate-{i}", max_shard_size=max_shard_size, progress=progress
            )
            score = float(eval_fn(load_for_eval(candidate, base)))
            accepted = better(score, best)
            history.append(
                {"ingredient": path, "score": score, "best_before": best, "accepted": accepted,
                 "soup_size": len(soup) + accepted}
            )  # fmt: skip
            logger.info(
                f"greedy soup: adding {path} gives {score:.6g} (best so far {best:.6g}): "
                f"{'accepted' if accepted else 'rejected'}, {len(soup) + accepted} ingredient(s)"
            )
            if accepted:
                soup, best = [*soup, path], score
            shutil.rmtree(candidate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = uniform_soup(
        soup, output_dir=output_dir, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress
    )
    return GreedySoupResult(output, soup, own, history, best)


# ---------------------------------------------------------------------------------------------- sweeps
def gather_ingredients(folders: Sequence, checkpoints: bool = False, metric: str = "eval_loss") -> dict[str, float]:
    """The soup ingredients of a sweep: each folder that holds a saved model or adapter (a run's `output_dir`), or,
    for a folder that holds none, its sub-folders that do (a sweep's root). With `checkpoints`, the `checkpoint-*`
    folders of each run count too (a checkpoint soup).

    Returns:
        `dict[str, float | None]`: ingredient folder -> the last `metric` in its `trainer_state.json` (or the
        run's), None where none is logged; pass the known ones to [`greedy_soup`] as `scores`.
    """
    found = []
    for folder in map(Path, folders):
        runs = [folder] if _is_saved(folder) else sorted(path for path in folder.iterdir() if _is_saved(path))
        if not runs and not (checkpoints and folder.is_dir()):
            raise MergeError(f"{folder}: holds no saved model or adapter, nor sub-folders that do")
        for run in runs or [folder]:
            if _is_saved(run):
                found.append(run)
            if checkpoints:
                steps = [path for path in run.glob("checkpoint-*") if _is_saved(path)]
                found += sorted(steps, key=_step)
    return {str(path): _last_metric(path, metric) for path in found}


def _step(folder: Path) -> int:
    step = folder.name.rpartition("-")[2]
    return int(step) if step.isdigit() else -1


def _is_saved(folder: Path) -> bool:
    return folder.is_dir() and (
        (folder / "adapter_config.json").is_file()
        or ((folder / "config.json").is_file() and any(folder.glob("model*.safetensors")))
    )


def _last_metric(folder: Path, metric: str) -> float | None:
    # a run's folder holds its trainer state only if `save_state` was called; its last checkpoint always does
    latest = sorted(folder.glob("checkpoint-*/trainer_state.json"), key=lambda path: _step(path.parent), reverse=True)
    for state in [folder / "trainer_state.json", *latest]:
        if state.is_file():
            logged = [
                entry[metric] for entry in json.loads(state.read_text()).get("log_history", []) if metric in entry
            ]
            if logged:
                return float(logged[-1])
    return None
