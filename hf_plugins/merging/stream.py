"""The one loop every merge runs: tensor by tensor over the shards of a reference checkpoint, the same tensor loaded
from each input, combined, and handed to the shard writer; each input's files are unmapped after every shard."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .writer import ShardWriter, atomic_output, copy_side_files


def stream_merge(
    inputs: Sequence[Checkpoint],
    combine: Callable[[str, list[torch.Tensor]], torch.Tensor],
    output_dir,
    side_files_from: Checkpoint,
    config_update: dict | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    desc: str = "merge",
    progress: bool = True,
    config_from: Checkpoint | None = None,
) -> Path:
    """Write `combine(name, [each input's tensor name])` for every tensor of `inputs[0]` into `output_dir`, with the
    tokenizer and generation config of `side_files_from` and its config (`config_from`'s if given) updated with
    `config_update`. Returns the output folder."""
    from tqdm.auto import tqdm

    reference = inputs[0]
    with atomic_output(output_dir, overwrite) as staging:
        writer = ShardWriter(staging, max_shard_size, adapter=reference.is_adapter)
        shards = reference.shards()
        for _, names in tqdm(shards, desc=desc, unit="shard", disable=not progress):
            for name in names:
                writer.add(name, combine(name, [checkpoint.tensor(name) for checkpoint in inputs]))
            for checkpoint in inputs:
                checkpoint.release()
        writer.finish()
        copy_side_files(
            side_files_from.path,
            staging,
            config_update,
            adapter=side_files_from.is_adapter,
            config_source=config_from.path if config_from else None,
        )
    return Path(output_dir)
