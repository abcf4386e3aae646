"""Merge outputs: sharded safetensors and their index, written into a temporary folder that is renamed to the output
folder only when everything is written, so a failed or interrupted merge never leaves a partial model behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SAFE_INDEX, SAFE_WEIGHTS, MergeError


#: The files of a saved model besides its weights that `from_pretrained` and the tokenizer read
_SIDE_FILES = ("config.json", "generation_config.json")
_SIDE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges")


def check_output(output_dir, overwrite: bool = False) -> Path:
    """The output folder, refused if it exists and holds anything (unless `overwrite`)."""
    output = Path(output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise MergeError(f"output {output_dir} is a file; pass a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise MergeError(f"output {output_dir} already exists and is not empty; pass another folder or overwrite=True")
    return output


@contextlib.contextmanager
def atomic_output(output_dir, overwrite: bool = False):
    """Yield a temporary folder next to `output_dir`; on success it replaces `output_dir`, on any error it is
    removed."""
    output = check_output(output_dir, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def copy_side_files(
    source: Path, target: Path, config_update: dict | None = None, adapter: bool = False, config_source=None
) -> None:
    """Copy the config, generation config and tokenizer files of `source` (an adapter's `adapter_config.json`
    instead of the model files), the config from `config_source` if given, applying `config_update` to it."""
    config_name = ADAPTER_CONFIG if adapter else "config.json"
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name == config_name:
            continue
        if path.name in _SIDE_FILES or path.name.startswith(_SIDE_PREFIXES):
            shutil.copy2(path, target / path.name)
    config = json.loads((Path(config_source or source) / config_name).read_text())
    config.update(config_update or {})
    (target / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class ShardWriter:
    """Collects output tensors and writes a shard whenever `max_shard_size` bytes are buffered; `finish()` names the
    shards `model-0000i-of-0000n.safetensors` and writes the index (one file: `model.safetensors`). An adapter is
    written as one `adapter_model.safetensors`, the only file PEFT reads."""

    def __init__(self, folder: Path, max_shard_size: int | str = "5GB", adapter: bool = False):
        from transformers.utils.hub import convert_file_size_to_int

        self.folder, self.adapter = folder, adapter
        self.max_bytes = convert_file_size_to_int(max_shard_size)
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = self.total = 0
        self.written: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if not self.adapter and self.buffer and self.buffered + size > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total += size

    def _flush(self) -> None:
        file = f"shard-{len(self.written):05d}.tmp"
        save_file(self.buffer, self.folder / file, metadata={"format": "pt"})
        self.written.append((file, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> None:
        if self.buffer or not self.written:
            self._flush()
        if self.adapter:
            os.replace(self.folder / self.written[0][0], self.folder / ADAPTER_WEIGHTS)
            return
        if len(self.written) == 1:
            os.replace(self.folder / self.written[0][0], self.folder / SAFE_WEIGHTS)
            return
        weight_map = {}
        for i, (file, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.replace(self.folder / file, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
