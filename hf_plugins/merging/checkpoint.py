"""Saved checkpoints read tensor by tensor: a model folder (`config.json` + safetensors, one file or shards with an
index) or a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

Only the file headers are read when a checkpoint is opened (names, shapes, dtypes), so every input can be checked
against the others before a single weight is loaded or anything is written. Tensors are then loaded one at a time
from memory-mapped files, and `release()` unmaps the files, so a merge holds about one shard per input.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open


#: The decoder-block index in Hugging Face parameter names (`model.layers.11.mlp.up_proj.weight`).
DEFAULT_LAYER_PATTERN = r"(?:^|\.)layers\.(\d+)\."

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

#: LoRA factors in PEFT's saved names: the "A" factor (rank on dim 0), the "B" factor (rank on dim 1)
_LORA_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.weight$")
_PEFT_PREFIX = "base_model.model."


class MergeError(ValueError):
    """Bad input to a merge: raised before anything is written (the command line prints it as one line)."""


@dataclass
class Checkpoint:
    """The header of a saved model or LoRA adapter: its config and, per tensor, the file, shape and dtype.

    Open one with [`Checkpoint.open`]; load tensors with [`Checkpoint.tensor`], unmap the files with `release()`.
    """

    path: Path
    config: dict
    is_adapter: bool
    files: dict[str, str]  # tensor name -> file name inside `path`, in the order the files store them
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    _handles: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path, role: str = "checkpoint") -> Checkpoint:
        """Read the config and every file header of the model or adapter saved in `path`. `role` names the input
        in error messages (`"--base"`, `"ingredient 2"`)."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise MergeError(f"{role} {path}: not a folder; pass the folder of a model saved with `save_pretrained`")
        if (folder / ADAPTER_CONFIG).is_file():
            config, files = _read_json(folder / ADAPTER_CONFIG, role), [ADAPTER_WEIGHTS]
            if not (folder / ADAPTER_WEIGHTS).is_file():
                raise MergeError(f"{role} {path}: the adapter has no {ADAPTER_WEIGHTS} (save it with safetensors)")
            _check_lora_config(config, role, path)
        elif (folder / "config.json").is_file():
            config = _read_json(folder / "config.json", role)
            if (folder / SAFE_INDEX).is_file():
                weight_map = _read_json(folder / SAFE_INDEX, role).get("weight_map", {})
                files = list(dict.fromkeys(weight_map.values()))
                missing = [name for name in files if not (folder / name).is_file()]
                if missing:
                    raise MergeError(
                        f"{role} {path}: the index names the shard {missing[0]}, which is missing "
                        f"({len(missing)} of {len(files)} shards missing); copy the whole saved folder"
                    )
            elif (folder / SAFE_WEIGHTS).is_file():
                files = [SAFE_WEIGHTS]
            else:
                raise MergeError(
                    f"{role} {path}: no {SAFE_WEIGHTS} or {SAFE_INDEX}; merges read safetensors only "
                    "(re-save the model with `save_pretrained`)"
                )
        else:
            raise MergeError(f"{role} {path}: the folder holds no config.json or {ADAPTER_CONFIG}")
        names, shapes, dtypes = {}, {}, {}
        for name in files:
            try:
                with safe_open(folder / name, framework="pt") as handle:
                    for key in handle.keys():
                        view = handle.get_slice(key)
                        names[key], shapes[key], dtypes[key] = name, tuple(view.get_shape()), view.get_dtype()
            except Exception as error:  # a truncated or foreign file: safetensors' own message says which
                raise MergeError(f"{role} {path}: cannot read {name} ({error})") from None
        return cls(folder, config, folder.joinpath(ADAPTER_CONFIG).is_file(), names, shapes, dtypes)

    # ---------------------------------------------------------------------------------------------- tensors
    def tensor(self, name: str) -> torch.Tensor:
        """Load one tensor (its file stays mapped until `release()`)."""
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file].get_tensor(name)

    def release(self) -> None:
        """Unmap the files opened so far, so their pages leave this process's memory."""
        self._handles.clear()

    def shards(self) -> list[tuple[str, list[str]]]:
        """(file, the tensor names it holds) for each file, in order."""
        grouped: dict[str, list[str]] = {}
        for name, file in self.files.items():
            grouped.setdefault(file, []).append(name)
        return list(grouped.items())

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(shape) * _itemsize(self.dtypes[name]) for name, shape in self.shapes.items())

    # ---------------------------------------------------------------------------------------------- config
    @property
    def model_config(self) -> dict:
        """The decoder's config (a multimodal model's `text_config`)."""
        return self.config.get("text_config") or self.config

    @property
    def num_layers(self) -> int | None:
        return self.model_config.get("num_hidden_layers")

    @property
    def architecture(self) -> str:
        return ",".join(self.config.get("architectures") or [self.config.get("model_type", "?")])

    @property
    def ties_embeddings(self) -> bool:
        # the default of `PreTrainedConfig.tie_word_embeddings`
        return bool(self.config.get("tie_word_embeddings", self.model_config.get("tie_word_embeddings", True)))

    @property
    def vocab_size(self) -> int | None:
        return self.model_config.get("vocab_size")

    # ---------------------------------------------------------------------------------------------- LoRA
    def lora_scaling(self, module: str) -> float:
        """PEFT's `scaling` of one adapted module: lora_alpha / r (/ sqrt(r) with rsLoRA), per-module patterns
        included."""
        from peft.utils.other import get_pattern_key

        config = self.config
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
        return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_factor(name: str) -> tuple[str, str] | None:
    """(module path in the base model, "A" or "B") for a LoRA factor's saved name, else None."""
    match = _LORA_FACTOR.match(name)
    if match is None:
        return None
    module = match["module"].removeprefix(_PEFT_PREFIX)
    return module, match["factor"][-1]


def layer_index(name: str, pattern: str = DEFAULT_LAYER_PATTERN) -> int | None:
    """The decoder-block index in a parameter name (`pattern`'s first group), or None outside the blocks."""
    match = re.search(pattern, name)
    return int(match.group(1)) if match else None


def count_layers(checkpoint: Checkpoint, pattern: str = DEFAULT_LAYER_PATTERN) -> int:
    """The number of decoder blocks: the config's `num_hidden_layers`, else the highest parsed index + 1."""
    indices = [index for name in checkpoint.files if (index := layer_index(name, pattern)) is not None]
    if not indices:
        raise MergeError(
            f"{checkpoint.path}: no parameter name matches the layer pattern {pattern!r}; pass `layer_pattern` "
            "(a regex whose first group is the block index)"
        )
    return checkpoint.num_layers or max(indices) + 1


# ---------------------------------------------------------------------------------------------- checks
def check_compatible(reference: Checkpoint, others: list[Checkpoint], roles: list[str], lora_ranks: bool = False):
    """The same kind of checkpoint, architecture, tied embeddings, tensor names, shapes and dtypes as `reference`;
    the first difference is raised. With `lora_ranks`, LoRA factors may differ in rank (dim 0 of A, dim 1 of B)."""
    for other, role in zip(others, roles):
        where = f"{role} {other.path} and {reference.path}"
        if other.is_adapter != reference.is_adapter:
            raise MergeError(f"{where}: one is a LoRA adapter and the other a full model; merge like with like")
        if not reference.is_adapter:
            if other.architecture != reference.architecture:
                raise MergeError(
                    f"{where}: different architectures ({other.architecture} vs {reference.architecture})"
                )
            if other.ties_embeddings != reference.ties_embeddings:
                raise MergeError(
                    f"{where}: one ties its input and output embeddings (tie_word_embeddings) and the other does not"
                )
        missing = [name for name in reference.files if name not in other.files]
        extra = [name for name in other.files if name not in reference.files]
        if missing or extra:
            first = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the other lacks"
            raise MergeError(f"{where}: different tensors: {role} {first} ({len(missing) + len(extra)} differ)")
        for name in reference.files:
            shape, reference_shape = other.shapes[name], reference.shapes[name]
            if lora_ranks and (factor := lora_factor(name)) is not None:
                rank_dim = 0 if factor[1] == "A" else 1
                shape = shape[:rank_dim] + shape[rank_dim + 1 :]
                reference_shape = reference_shape[:rank_dim] + reference_shape[rank_dim + 1 :]
            if shape != reference_shape:
                raise MergeError(f"{where}: {name} has shape {other.shapes[name]} vs {reference.shapes[name]}")
            if other.dtypes[name] != reference.dtypes[name]:
                raise MergeError(f"{where}: {name} has dtype {other.dtypes[name]} vs {reference.dtypes[name]}")


def check_adapter_fits(adapter: Checkpoint, base: Checkpoint, adapter_role: str, base_role: str) -> None:
    """Every module the adapter adapts is a weight of `base` with the adapter's input and output sizes."""
    if base.is_adapter:
        raise MergeError(f"{base_role} {base.path}: an adapter; pass the full base model the adapter was trained on")
    for name, shape in adapter.shapes.items():
        factor = lora_factor(name)
        if factor is None:
            continue
        weight = f"{factor[0]}.weight"
        if weight not in base.shapes:
            raise MergeError(
                f"{adapter_role} {adapter.path} does not fit {base_role} {base.path}: it adapts {factor[0]}, "
                "which the base does not have"
            )
        # A: [r, in, ...], B: [out, r, ...] (embeddings: A [r, vocab], B [dim, r]); some layers store [in, out]
        size = shape[1] if factor[1] == "A" else shape[0]
        if size not in base.shapes[weight][:2]:
            raise MergeError(
                f"{adapter_role} {adapter.path} does not fit {base_role} {base.path}: {name} has shape {shape}, "
                f"the base's {weight} {base.shapes[weight]}"
            )


def non_lora_tensors(adapter: Checkpoint) -> list[str]:
    """Tensors of an adapter that are not LoRA factors (`modules_to_save`, trainable tokens)."""
    return [name for name in adapter.files if lora_factor(name) is None]


def _check_lora_config(config: dict, role: str, path) -> None:
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{role} {path}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged here")
    for key, why in (("use_dora", "DoRA's magnitude"), ("lora_bias", "a LoRA bias")):
        if config.get(key):
            raise MergeError(
                f"{role} {path}: {why} ({key}=True) is not linear in the factors; merge the adapter into its base "
                "(`merge_and_unload`) and pass the full model"
            )


def _read_json(path: Path, role: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MergeError(f"{role} {path}: unreadable ({error})") from None


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 1)
