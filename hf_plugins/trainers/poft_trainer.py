"""`PoFTTrainer`: Preference-oriented SFT (arXiv 2412.12865) as a drop-in `SFTTrainer`.

The aligned models never enter training: their scores are a dataset column, `ref_score`, computed once beforehand with
`hf_plugins.score_with_aligned_models` (cached by `datasets`). The collator carries the column through TRL's
preparation, and the loss is the fused `"poft"` head: a no-grad pass of the head gives each sequence's policy score,
then one pass computes the loss and the gradients together. No logits are ever built.

Normalisation: the loss is a mean over sequences. `num_items_in_batch` is made the number of sequences with a trained
token in the whole accumulated batch, across processes, so gradient accumulation 4 x 1 equals 1 x 4 and DDP equals
one process, as the token count does for SFT. Packed rows (`bfd`) count their sequences, each with its own score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from trl.data_utils import get_dataset_column_names

from ..data.packing import any_per_sequence, batch_sequences, packed_position_ids, sequence_values
from ..losses.poft import SCORER
from ..ops.method import IGNORE_INDEX
from ..utils import get_logger
from .fused_sft_trainer import FusedSFTTrainer
from .poft_config import PoFTConfig


logger = get_logger(__name__)

REF_SCORE_COLUMN = "ref_score"


def scoped_labels(batch: dict[str, Any], scope: str) -> torch.Tensor:
    """The labels the policy's score averages over: TRL's labels (`"completion"`), or every non-padding token of the
    sequence (`"full"`: the input ids where the attention mask is set, the official code's prompt + response scope)."""
    labels = batch["labels"]
    if scope == "completion":
        return labels
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        tokens = attention_mask.to(labels.device).bool()
    elif batch.get("position_ids") is not None:
        # Padding-free: every position is a token but the padding to `pad_to_multiple_of`, which sits at position 0
        # like each sequence's first token (whose label nothing before it in the sequence predicts): TRL's own mask
        tokens = batch["position_ids"].to(labels.device) != 0
    else:
        raise ValueError(
            "poft_target_scope='full' needs the batch's `attention_mask` (or, padding-free, its `position_ids`) to "
            "tell padding from tokens: use TRL's collator, or poft_target_scope='completion'."
        )
    input_ids = batch["input_ids"].to(labels.device)
    return torch.where(tokens, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def trained_sequences(labels: torch.Tensor, sequences: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """`[S]` bool: the sequences with at least one label after the next-token shift; `sequences` as
    `hf_plugins.data.packing.batch_sequences` gives them (default: one per row)."""
    return any_per_sequence(labels[:, 1:] != IGNORE_INDEX, sequences or batch_sequences({"labels": labels}))


class PoFTTrainer(FusedSFTTrainer):
    """
    Trainer for Preference-oriented SFT (PoFT), a drop-in replacement for `trl.SFTTrainer`.

    Each sequence's loss is `-log sigmoid(beta * (r_theta - ref_score) + gamma)`, where `r_theta` is the policy's mean
    per-token log-prob of the response and `ref_score` the aligned models' mean score of it; the batch loss is the mean
    over sequences. The gradient is length-normalised SFT with a per-sequence weight `sigmoid(beta * (ref_score -
    r_theta) - gamma)` in (0, 1): large when the aligned models find the response likely and the policy does not yet,
    vanishing once the policy beats them.

    The datasets need a `ref_score` column: compute it once with `hf_plugins.score_with_aligned_models` (the aligned
    models are not loaded during training, so a step costs what an SFT step costs, plus one no-grad matmul of the
    lm_head). It takes exactly the arguments of `SFTTrainer`; pass a [`PoFTConfig`] as `args`.

    Logged metrics (besides TRL's): `reward_margin` (mean `r_theta - ref_score` per sequence), `poft_weight` (mean
    sigmoid weight per sequence), `policy_score` (mean `r_theta`) and `nll` (the plain NLL per supervised token).

    Example:
        ```python
        from hf_plugins import PoFTConfig, PoFTTrainer, score_with_aligned_models

        aligned = ["Qwen/Qwen2.5-1.5B-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct"]
        dataset = score_with_aligned_models(dataset, aligned)  # adds the `ref_score` column, cached
        trainer = PoFTTrainer(model="Qwen/Qwen2.5-0.5B", args=PoFTConfig(output_dir="out"), train_dataset=dataset)
        trainer.train()
        ```
    """

    _tag_names = ["trl", "sft", "hf-plugins", "poft"]
    config_class = PoFTConfig
    command = "poft"
    description = "Preference-oriented SFT against aligned models' scores (`ref_score`)"
    dataset_needs = {
        "required_columns": {
            "ref_score": "add the aligned models' scores with `hf_plugins.score_with_aligned_models(dataset, "
            "aligned_models)`, save the result (`save_to_disk`) and pass that folder",
        }
    }
    _name = "PoFT"
    _paper = {
        "title": (
            "Preference-Oriented Supervised Fine-Tuning: Favoring Target Model Over Aligned Large Language Models"
        ),
        "id": "2412.12865",
    }

    example_columns = (REF_SCORE_COLUMN,)

    def __init__(self, model, args: PoFTConfig | None = None, *positional, **kwargs):
        args = self.coerce_args(model, args)
        train_dataset = kwargs.get("train_dataset", positional[1] if len(positional) > 1 else None)
        self._resolve_assistant_only_loss(args, train_dataset)
        super().__init__(model, args, *positional, **kwargs)

    @staticmethod
    def _resolve_assistant_only_loss(args: PoFTConfig, dataset) -> None:
        """`assistant_only_loss=None` (PoFTConfig's default): on for `messages` conversations under the "completion"
        scope, so that the policy's score covers the assistant turns, as the aligned models' scores do; off else."""
        columns = ()
        if dataset is not None and not isinstance(dataset, dict):
            try:
                columns = get_dataset_column_names(dataset)
            except (AttributeError, TypeError):
                columns = ()
        conversations = "messages" in columns and "input_ids" not in columns
        if args.assistant_only_loss is None:
            args.assistant_only_loss = bool(conversations and args.poft_target_scope == "completion")
        elif conversations and args.poft_target_scope == "completion" and not args.assistant_only_loss:
            logger.warning(
                "PoFT with poft_target_scope='completion' on a `messages` dataset and `assistant_only_loss=False`: "
                "the policy's score averages over every token (system and user turns too) while the aligned models "
                "score only the assistant content. Leave `assistant_only_loss` unset (or True) to score the same "
                "tokens, or set poft_target_scope='full' to make the official code's choice explicit."
            )

    # ------------------------------------------------------------------ dataset preparation
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = get_dataset_column_names(dataset)
        if REF_SCORE_COLUMN not in columns:
            raise ValueError(
                f"The {dataset_name} dataset has no `{REF_SCORE_COLUMN}` column, which PoFTTrainer needs (the aligned "
                f"models' mean per-token log-prob of each response). Add it with `{SCORER}(dataset, aligned_models)`."
            )
        if isinstance(dataset, Dataset):
            scores = np.asarray(dataset.with_format("numpy")[REF_SCORE_COLUMN], dtype=np.float64)
            bad = int((~np.isfinite(scores)).sum())
            if bad:
                raise ValueError(
                    f"The {dataset_name} dataset's `{REF_SCORE_COLUMN}` column holds {bad} NaN or infinite value(s) "
                    f"(examples `{SCORER}` found no response token to score, e.g. emptied by its `max_length`). Drop "
                    f"them first: `dataset = dataset.filter(lambda row: math.isfinite(row['{REF_SCORE_COLUMN}']))`."
                )
        # (packed rows are fewer than the examples: the count of skipped examples is for unpacked data only)
        before = len(dataset) if isinstance(dataset, Dataset) and not packing else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if before is not None and len(dataset) < before:
            # TRL drops the examples that truncation to `max_length` left without a supervised token
            logger.warning(
                f"PoFT: {before - len(dataset)} of {before} examples of the {dataset_name} dataset have no response "
                f"token left after truncation to max_length={args.max_length} and are skipped."
            )
        return dataset

    # ------------------------------------------------------------------ loss
    def loss_method(self) -> str:
        # The per-sequence metrics come back with the head's metrics (`PoFTMethod.metric_counts`)
        return "poft"

    def loss_method_inputs(self, model, inputs: dict[str, Any], extra_columns: dict[str, torch.Tensor]):
        if REF_SCORE_COLUMN not in extra_columns:
            raise ValueError(f"The batch has no `{REF_SCORE_COLUMN}` column: add it to the dataset with `{SCORER}`.")
        # `inputs` is this call's own copy (compute_loss): the scope changes the labels the head sees only
        inputs["labels"] = scoped_labels(inputs, self.args.poft_target_scope)
        # One score per sequence: per row, or per packed sequence (the collator's per-token form, read back at the
        # sequences the head finds from the position ids it is given)
        ref_scores = sequence_values(extra_columns[REF_SCORE_COLUMN], inputs, REF_SCORE_COLUMN)
        groups = {
            "other_inputs": {
                "ref_scores": ref_scores.to(inputs["labels"].device),
                "beta": self.args.beta,
                "gamma": self.args.gamma,
            }
        }
        position_ids = packed_position_ids(inputs)
        if position_ids is not None:
            groups["token_inputs"] = {"position_ids": position_ids}
        return groups

    def trained_sequences(self, batch: dict[str, Any]) -> torch.Tensor | None:
        # PoFT's loss is a mean over sequences: the global count of sequences (packed ones too) with a scored token
        if "labels" not in batch:
            return None
        return trained_sequences(scoped_labels(batch, self.args.poft_target_scope), batch_sequences(batch))

    def whole_sequence_loss(self, args) -> str | None:
        return "its loss compares each sequence's mean log-prob with the aligned models' score of the whole response"
