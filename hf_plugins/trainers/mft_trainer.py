"""`MFTTrainer`: Masked Thought Fine-Tuning (arXiv 2403.02178) as a drop-in `SFTTrainer`.

The loss is SFT's, on the fused head; what MFT changes is the model's input. In training mode, every micro-batch's
`input_ids` get a random share of their response tokens replaced (`hf_plugins.data.mft`) before the forward, while
the labels keep the original ids. The share follows the official schedule over the optimizer steps, computed here
from `self.state.global_step` for each micro-batch: a collator would compute it in the data-loader workers, whose
copies of the trainer state go stale when `dataloader_num_workers > 0`. The masking generator is seeded per process
and saved in every checkpoint (`MethodGeneratorMixin`); evaluation reads the clean inputs and draws nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..data.mft import MASK_TOKEN, add_mask_token, mask_response_tokens, scheduled_mask_rate
from .fused_sft_trainer import FusedSFTTrainer
from .generator_state import MethodGeneratorMixin
from .metric_logging import StepMean
from .mft_config import MFTConfig


#: Name of the file, inside a checkpoint folder, that holds the masking generator's state
MFT_RNG_STATE_NAME = "mft_rng_state"


class MFTTrainer(MethodGeneratorMixin, FusedSFTTrainer):
    """
    Trainer for Masked Thought Fine-Tuning: TRL's `SFTTrainer` whose training inputs have a random share of their
    response tokens replaced by a mask token or a random token, the labels unchanged.

    It takes exactly the arguments of `SFTTrainer`; pass an [`MFTConfig`] as `args` for the MFT hyperparameters (a
    plain `SFTConfig` gets MFT's defaults). The response is what the labels supervise (`labels != -100`), so train
    with `assistant_only_loss=True` on conversations or `completion_only_loss` on prompt-completion data: with labels
    on whole sequences the prompt is masked too (the trainer warns).

    With `mask_token="mask"` and `replace_rate < 1` the trainer adds `<mask>` to the tokenizer (unless it has it) and
    to the model's embeddings, its input and output rows set to the mean of the existing rows; the tokenizer and model
    it saves include it. Under PEFT that new row could not train and the adapter would not load onto the base model,
    so that setting is refused there (`mask_token="pad"` or `replace_rate=1` work with adapters).

    Attributes:
        mft_generator (`torch.Generator`): the masking generator, on the training device, seeded with `mft_seed` (or
            `seed`) plus the process index, saved as `mft_rng_state.pth` in every checkpoint.

    Logged metrics: `mft/mask_rate` (the step's scheduled p_t) and `mft/masked_fraction` (masked / response tokens
    over every process).
    """

    _tag_names = ["trl", "sft", "hf-plugins", "mft"]
    generator_state_name = MFT_RNG_STATE_NAME
    config_class = MFTConfig
    command = "mft"
    description = "Masked Thought: SFT on responses whose input tokens are partly masked"
    _name = "MFT"
    _paper = {
        "title": "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning Learning "
        "of Language Models",
        "id": "2403.02178",
    }

    @classmethod
    def adapter_refusal(cls, args) -> str | None:
        """Why these settings cannot train PEFT adapters (None: they can): a new `<mask>` token needs trainable
        embedding rows."""
        if isinstance(args, MFTConfig) and args.uses_mask_token and args.mask_token == "mask":
            return (
                f"`mask_token='mask'` with `replace_rate={args.replace_rate}` adds a {MASK_TOKEN} token whose embedding "
                "rows adapters cannot train (and the adapter would not load onto the base model without them): set "
                "`mask_token='pad'` (--mask_token pad) or `replace_rate=1` (--replace_rate 1) with adapters"
            )
        return None

    def __init__(self, model, args: MFTConfig | None = None, *positional, **kwargs):
        args = self.coerce_args(model, args)
        processing_class = kwargs.get("processing_class")
        has_mask_token = processing_class is not None and MASK_TOKEN in _tokenizer_of(processing_class).get_vocab()
        refusal = self.adapter_refusal(args)
        if refusal and not has_mask_token and (kwargs.get("peft_config") is not None or is_peft_model(model)):
            raise ValueError(f"{type(self).__name__}: {refusal}.")
        if refusal and not has_mask_token and is_deepspeed_zero3_enabled():
            raise ValueError(
                f"{type(self).__name__} cannot add its {MASK_TOKEN} token under DeepSpeed ZeRO-3, whose embedding rows "
                "are partitioned: set `mask_token='pad'` or `replace_rate=1`, or add the token to the tokenizer and "
                "model before training."
            )
        super().__init__(model, args, *positional, **kwargs)
        self.mft_generator = self._make_method_generator(self.args.mft_seed)

        tokenizer = self._tokenizer
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._mask_token_id = None
        if self.args.uses_mask_token:
            if self.args.mask_token == "mask":
                self._mask_token_id = add_mask_token(base, tokenizer)
            else:
                self._mask_token_id = tokenizer.pad_token_id
        # The official code draws random tokens among the tokenizer's base vocabulary (no added tokens)
        self._random_vocab_size = min(tokenizer.vocab_size, base.get_input_embeddings().weight.shape[0])
        self._warn_if_labels_cover_prompts()

    def _warn_if_labels_cover_prompts(self) -> None:
        dataset = self.train_dataset
        columns = getattr(dataset, "column_names", None)
        if not columns or self.args.mask_rate == 0 or not hasattr(dataset, "select"):
            return
        if {"completion_mask", "assistant_masks"} & set(columns):
            return  # TRL turns these masks into the labels at collation
        if "labels" in columns:  # TRL's prepared labels (-100 outside the trained turns)
            rows = dataset.select(range(min(16, len(dataset))))["labels"]
            if any(-100 in row for row in rows):
                return
        warnings.warn(
            "MFTTrainer masks the tokens the labels supervise, and this training set's labels cover whole sequences "
            "(no prompt left out of the loss): prompts are masked too. Set `assistant_only_loss=True` for "
            "conversations, or use a prompt-completion dataset, to mask only the responses.",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ masking
    def current_mask_rate(self) -> float:
        """p_t for the optimizer step being trained: `global_step` counts the steps already taken, so every
        micro-batch of one step gets the same rate (and the first step 0 under the linear schedule)."""
        if self.args.mask_rate_schedule == "constant":
            return float(self.args.mask_rate)
        return scheduled_mask_rate(
            self.state.global_step, self.state.max_steps, self.args.mask_rate, self.args.mask_rate_warmup_ratio
        )

    def loss_method_inputs(self, model, inputs: dict[str, Any], extra_columns) -> dict[str, dict[str, Any]]:
        if self.model.training and "labels" in inputs and "input_ids" in inputs:
            rate = self.current_mask_rate()
            labels = inputs["labels"]
            inputs["input_ids"], masked = mask_response_tokens(
                inputs["input_ids"],
                labels,
                rate,
                generator=self.mft_generator,
                mask_token_id=self._mask_token_id,
                replace_rate=self.args.replace_rate,
                vocab_size=self._random_vocab_size,
            )
            self._log_masking(rate, masked, labels)
        return super().loss_method_inputs(model, inputs, extra_columns)

    def _log_masking(self, rate: float, masked: torch.Tensor, labels: torch.Tensor) -> None:
        local = torch.stack([masked.sum(), (labels != -100).sum()]).float()
        masked_total, response_total = self.accelerator.gather_for_metrics(local.unsqueeze(0)).sum(0)
        self._metrics["train"]["mft/mask_rate"].append(rate)
        self._metrics["train"]["mft/masked_fraction"].append(StepMean(masked_total, response_total))


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)
