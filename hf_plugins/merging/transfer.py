"""Fine-tuning transfer (Lin et al., EMNLP 2025, arXiv 2503.20110; official script: pjlintw/finetuning-transfer,
`tools/run_transfer_finetuning.py`).

theta'_target = theta_target_base + lam * (theta_source_ft - theta_source_base), per tensor in float64, saved in the
target base's dtype. When the fine-tune's vocabulary is larger (tokens added while fine-tuning), the embedding and
lm_head rows of both bases are zero-padded to its size, as the official script does, so the new tokens carry their
fine-tuned rows over (times lam).

A LoRA adapter's update is B A whatever the base, so transferring a LoRA fine-tune is re-attaching the adapter to the
new base: the output is the adapter with `base_model_name_or_path` set to the target base (B scaled by lam).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils import is_real
from .checkpoint import Checkpoint, MergeError, check_adapter_fits, check_compatible, lora_factor
from .stream import stream_merge
from .writer import check_output


def _vocab_rows(name: str, checkpoint: Checkpoint) -> bool:
    """Whether a tensor's rows are the vocabulary (input embeddings, lm_head)."""
    shape = checkpoint.shapes[name]
    return len(shape) == 2 and shape[0] == checkpoint.vocab_size


def _check_bases(source_ft: Checkpoint, source_base: Checkpoint, target_base: Checkpoint) -> None:
    """The two bases match each other exactly; the fine-tune matches them but for more vocabulary rows."""
    check_compatible(source_base, [target_base], ["target_base"])
    if source_ft.architecture != source_base.architecture or source_ft.ties_embeddings != source_base.ties_embeddings:
        check_compatible(source_base, [source_ft], ["source_ft"])  # raises with the reason
    for name in source_base.files:
        if name not in source_ft.files:
            raise MergeError(f"source_ft {source_ft.path} lacks {name}, which source_base has")
        ft_shape, base_shape = source_ft.shapes[name], source_base.shapes[name]
        padded = _vocab_rows(name, source_base) and ft_shape[1:] == base_shape[1:] and ft_shape[0] > base_shape[0]
        if ft_shape != base_shape and not padded:
            raise MergeError(
                f"source_ft {source_ft.path} and source_base {source_base.path}: {name} has shape {ft_shape} vs "
                f"{base_shape} (only the vocabulary rows of the fine-tune may outnumber the base's)"
            )
        if source_ft.dtypes[name] != source_base.dtypes[name]:
            raise MergeError(f"source_ft and source_base: {name} has dtype {source_ft.dtypes[name]} vs "
                             f"{source_base.dtypes[name]}")  # fmt: skip
    extra = [name for name in source_ft.files if name not in source_base.files]
    if extra:
        raise MergeError(f"source_ft {source_ft.path} has {extra[0]}, which source_base lacks")


def transfer_finetuning(
    source_ft,
    source_base,
    target_base,
    lam: float = 1.0,
    *,
    output_dir,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Carry a fine-tune over to a new version of its base: target_base + lam * (source_ft - source_base).

    Parameters:
        source_ft (`str` or `os.PathLike`):
            Folder of the fine-tuned model, or of a LoRA adapter trained on `source_base`.
        source_base (`str` or `os.PathLike`):
            Folder of the base the fine-tune started from.
        target_base (`str` or `os.PathLike`):
            Folder of the new base: the same architecture, tensor names and shapes as `source_base` (the same
            lineage, e.g. the next release or a continued pretraining).
        lam (`float`, *optional*, defaults to `1.0`):
            Scale of the transferred update (1 in the official script).
        output_dir (`str` or `os.PathLike`):
            Folder of the result: the target base's config (with the fine-tune's `vocab_size`) and the fine-tune's
            tokenizer and generation config (its chat template and any added tokens); for an adapter, the adapter
            with `base_model_name_or_path` set to `target_base`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest output shard, as in `save_pretrained`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing output folder.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the shards.

    Returns:
        `Path`: the output folder.
    """
    if not is_real(lam):
        raise MergeError(f"lam={lam!r} must be a number (1.0 in the official script)")
    ft_ck = Checkpoint.open(source_ft, "source_ft")
    src_ck, tgt_ck = Checkpoint.open(source_base, "source_base"), Checkpoint.open(target_base, "target_base")
    if ft_ck.is_adapter:
        check_adapter_fits(ft_ck, src_ck, "source_ft", "source_base")
        check_compatible(src_ck, [tgt_ck], ["target_base"])
        check_output(output_dir, overwrite)

        def rescale(name, tensors):
            (tensor,) = tensors
            factor = lora_factor(name)
            if factor is not None and factor[1] == "A":
                return tensor
            # B (and full tensors of modules_to_save, which have no base to subtract: kept as trained) times lam
            return (tensor.to(torch.float64) * lam).to(tensor.dtype) if factor is not None else tensor

        update = {"base_model_name_or_path": str(target_base)}
        return stream_merge(
            [ft_ck], rescale, output_dir, ft_ck, update, max_shard_size, overwrite, "transfer", progress
        )

    _check_bases(ft_ck, src_ck, tgt_ck)
    check_output(output_dir, overwrite)

    def combine(name, tensors):
        finetuned, source, target = (tensor.to(torch.float64) for tensor in tensors)
        if finetuned.shape[0] > source.shape[0]:  # the official script's zero padding of the vocabulary rows
            source = torch.nn.functional.pad(source, (0, 0, 0, finetuned.shape[0] - source.shape[0]))
            target = torch.nn.functional.pad(target, (0, 0, 0, finetuned.shape[0] - target.shape[0]))
        return (target + lam * (finetuned - source)).to(tensors[2].dtype)

    # the target base's architecture settings, the fine-tune's vocabulary and tokenizer
    config_update = {"vocab_size": ft_ck.vocab_size} if ft_ck.vocab_size != tgt_ck.vocab_size else None
    return stream_merge(
        [ft_ck, src_ck, tgt_ck],
        combine,
        output_dir,
        ft_ck,
        config_update,
        max_shard_size,
        overwrite,
        "transfer",
        progress,
        config_from=tgt_ck,
    )
