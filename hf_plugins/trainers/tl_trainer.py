"""`TLTrainer`: TL-Training (arXiv 2412.15495) for tool-use SFT, as a drop-in `SFTTrainer`.

Dataset preparation renders each tool-calling conversation with the chat template and computes, once (cached by
`datasets`), its labels and per-token weights (`hf_plugins.data.tool_calls.tokenize_tool_conversation`): MAE drops
the assistant turns whose tool responses are errors from the targets, PKT up-weights the tool-name decision tokens.
The collator carries the weights, and the loss is the fused `"weighted"` head: no logits are ever built.

Normalisation ("sample", the official code's): every sequence's loss is `sum_t w_t l_t / sum_t w_t`, and the batch
loss is their mean. The `"weighted"` method computes `sum_t c_t l_t / num_items_in_batch`, so the trainer passes
`c_t = w_t / sum_{t' in its sequence} w_t'` and makes `num_items_in_batch` the number of sequences (with a trained
token) in the whole accumulated batch, across processes. Each micro-batch then adds exactly its sequences' share of
the global mean, so gradient accumulation 4 x 1 equals 1 x 4 and DDP equals one process, like the token count does for
SFT. Packed rows count and normalise their sequences, not the rows. ("token" normalisation keeps TRL's token count:
`sum_t w_t l_t / number of trained tokens`.)
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import global_then_local_main_first

from ..data.packing import any_per_sequence, batch_sequences, sum_per_sequence
from ..data.tool_calls import IGNORE_INDEX, example_messages, tokenize_tool_conversation, truncate_columns
from .fused_sft_trainer import FusedSFTTrainer
from .tl_config import TLConfig


_TOKEN_COLUMNS = ("input_ids", "labels", "token_weights")


def trained_sequences(
    labels: torch.Tensor, token_weights: torch.Tensor, sequences: tuple[torch.Tensor, int] | None = None
) -> torch.Tensor:
    """`[S]` bool: the sequences with at least one trained position (a label that is not -100, predicted from the
    position before it, with a positive weight); `sequences` as `hf_plugins.data.packing.batch_sequences` gives them
    (default: one per row)."""
    trained = (labels[:, 1:] != IGNORE_INDEX) & (token_weights[:, 1:].to(labels.device) > 0)
    return any_per_sequence(trained, sequences or batch_sequences({"labels": labels}))


def per_sequence_normalized(
    token_weights: torch.Tensor, labels: torch.Tensor, sequences: tuple[torch.Tensor, int] | None = None
) -> torch.Tensor:
    """`w / sum_seq(w)`, the sum over each sequence's supervised positions (those with a label after the shift);
    sequences without weight keep zeros. `sequences` as `hf_plugins.data.packing.batch_sequences` gives them (packed
    rows hold several); default: one per row. The first position, which the head's shift drops, is left as it is."""
    ids, count = sequences or batch_sequences({"labels": labels})
    shifted = token_weights[:, 1:]
    supervised = labels[:, 1:].to(shifted.device) != IGNORE_INDEX
    totals = sum_per_sequence(shifted * supervised, (ids, count))[ids.to(shifted.device)]
    normalized = token_weights.clone()
    normalized[:, 1:] = shifted / torch.where(totals > 0, totals, torch.ones_like(totals))
    return normalized


class TLTrainer(FusedSFTTrainer):
    """
    Trainer for TL-Training's supervised stage (PKT + MAE), a drop-in replacement for `trl.SFTTrainer` on
    tool-calling conversations in the `messages` + `tools` format (assistant `tool_calls`, `tool` responses, JSON
    schemas in a `tools` column, as a list or a JSON string).

    It takes exactly the arguments of `SFTTrainer`; pass a [`TLConfig`] as `args` for TL-Training's settings. Rows
    already tokenized (`input_ids`) must bring `labels` and `token_weights` columns. The chat template must mark the
    assistant turns with `{% generation %}` markers (one is swapped in for the models TRL or
    `hf_plugins.chat_templates` knows).

    Logged metrics (besides TRL's): `token_weight`, the mean PKT weight per trained token (1 without key tokens).

    Example:
        ```python
        from hf_plugins import TLConfig, TLTrainer

        trainer = TLTrainer(
            model="Qwen/Qwen2.5-0.5B-Instruct",
            args=TLConfig(output_dir="out", max_weight=9.0),
            train_dataset=dataset,  # columns "messages" and "tools"
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "sft", "hf-plugins", "tl-training"]
    config_class = TLConfig
    command = "tl"
    description = "TL-Training: tool-call SFT with key-token weights and bad-call masking"
    dataset_needs = {"conversations_only": True, "tokenized_columns": ("labels", "token_weights")}
    _name = "TL-Training"
    _paper = {
        "title": "TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use",
        "id": "2412.15495",
    }

    token_columns = {"token_weights": 0.0}

    def __init__(self, model, args: TLConfig | None = None, *positional, **kwargs):
        if kwargs.get("formatting_func") is not None:
            raise ValueError(
                "`formatting_func` cannot be used with TLTrainer: it needs the conversations themselves (messages, "
                "tool calls and tools) to find the turns and tokens to weigh. Pass a `messages` + `tools` dataset."
            )
        super().__init__(model, args, *positional, **kwargs)

    # ------------------------------------------------------------------ dataset preparation
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = get_dataset_column_names(dataset)
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}

        def described(text):
            if not isinstance(dataset, Dataset):  # `IterableDataset.map` takes no `desc`
                return map_kwargs
            return {**map_kwargs, "desc": f"{text} {dataset_name} dataset"}

        with global_then_local_main_first():
            if "input_ids" not in columns:
                example_messages(next(iter(dataset)))  # a clear error for non-conversational rows
                dataset = dataset.map(
                    tokenize_tool_conversation,
                    fn_kwargs={
                        "tokenizer": self._tokenizer,
                        "chat_template": self.chat_template,
                        "max_weight": args.max_weight,
                        "pkt": args.pkt,
                        "mae": args.mae,
                        "error_patterns": args.error_patterns,
                    },
                    remove_columns=columns,
                    **described("TL-Training: tokenizing and weighing tool calls of"),
                )
            elif "labels" not in columns or "token_weights" not in columns:
                raise ValueError(
                    f"The {dataset_name} dataset is already tokenized but has no `labels` and `token_weights` "
                    "columns, which TLTrainer needs. Pass the conversations (`messages` and `tools`) instead, or add "
                    "them with `hf_plugins.data.tokenize_tool_conversation`."
                )
            # TRL truncates `input_ids` and `labels` only: cut the weights with them, first (packing cuts every
            # packed column itself, the weights included)
            if args.max_length is not None and not packing:
                dataset = dataset.map(
                    truncate_columns,
                    fn_kwargs={"columns": _TOKEN_COLUMNS, "max_length": args.max_length, "mode": args.truncation_mode},
                    **described("TL-Training: truncating"),
                )
            # Rows left without a target (every turn masked by MAE, or truncated away) add no loss
            dataset = dataset.filter(
                lambda example: any(label != IGNORE_INDEX for label in example["labels"]),
                **described("TL-Training: dropping rows without targets from"),
            )
        return super()._prepare_dataset(dataset, processing_class, args, packing, None, dataset_name)

    # ------------------------------------------------------------------ loss
    def loss_method(self) -> str:
        return "weighted"

    def loss_method_inputs(self, model, inputs: dict[str, Any], extra_columns: dict[str, torch.Tensor]):
        labels = inputs["labels"]
        weights = extra_columns["token_weights"].to(labels.device)
        if self.args.weight_normalization == "sample":
            weights = per_sequence_normalized(weights, labels, batch_sequences(inputs))
        return {"token_inputs": {"token_weights": weights}}

    def trained_sequences(self, batch: dict[str, Any]) -> torch.Tensor | None:
        # "sample": the official per-sample normalisation, a mean over the sequences (packed ones too) with a
        # weighted token
        if self.args.weight_normalization != "sample" or "labels" not in batch or "token_weights" not in batch:
            return None
        return trained_sequences(batch["labels"], batch["token_weights"], batch_sequences(batch))

    def whole_sequence_loss(self, args) -> str | None:
        if args.weight_normalization != "sample":
            return None
        return "weight_normalization='sample' divides each sequence's weights by their sum; 'token' packs any way"

    def _log_head_metrics(self, mode: str, metric_sums, inputs: dict[str, Any], extra_columns) -> None:
        if "token_weight" in metric_sums:
            # The head sees the normalised weights under "sample": report the PKT weights themselves, summed over the
            # head's supervised tokens (a label after the shift) like the head's own sum
            labels = inputs["labels"]
            supervised = labels[:, 1:] != IGNORE_INDEX
            raw = extra_columns["token_weights"][:, 1:].to(labels.device)
            metric_sums = {**metric_sums, "token_weight": (raw * supervised).sum()}
        super()._log_head_metrics(mode, metric_sums, inputs, extra_columns)
