"""`FusedSFTTrainer`: TRL's `SFTTrainer` with the loss computed by this library's fused linear loss head.

Everything TRL does (dataset preparation, chat templates, completion-only and assistant-only masks, PEFT, packing,
accelerate) is inherited unchanged; only `compute_loss` changes, and, with assistant-only loss, the chat templates of
the families TRL cannot patch get their training versions from `hf_plugins.chat_templates`. It runs the backbone to
hidden states, keeps the supervised positions and calls `hf_plugins.ops.fused_linear_loss`, which never builds the
`[tokens, vocab]` logits and computes the gradients in the same pass. Method trainers (ASFT, OTR, PoFT, TL, ...)
subclass this class and override only `loss_method` / `loss_method_inputs` (and declare their extra columns).

Hooks for method trainers, in the order they run. Each gets what it needs as arguments and returns its result; no
hook leaves data on `self` for another one to read.

At construction:
    1. `whole_sequence_loss(args)` -> reason or None: packing strategies that cut sequences are refused when set.
    2. `loss_method()` (only with `loss_backend="liger"`): its name is checked against what Liger covers.
For each optimizer step, before its forward passes (`_get_num_items_in_batch`):
    3. `trained_sequences(batch)` for each micro-batch of the step, with the extra columns still in it -> `[B]` bool
       or None: the loss is then divided by the global count of trained sequences instead of tokens.
For each micro-batch (`compute_loss(model, inputs, num_items_in_batch=...)`; evaluation and direct calls without a
count first call `trained_sequences(inputs)` for the batch's own count):
    4. The extra columns (`token_columns`, `example_columns`) are popped from a shallow copy of `inputs`, the call's
       own: `extra_columns` (name -> tensor as collated, only the columns the batch has).
    5. `loss_method_inputs(model, inputs, extra_columns)` -> the head's input groups (`token_inputs`,
       `hidden_inputs`, `other_inputs`). It may replace entries of that copy of `inputs` (PoFT replaces the labels
       by the ones its score averages over); the forward and step 8 see the replaced ones.
    6. `loss_method()` -> the method's name or a `LossMethod` (stateless: it keeps nothing of the call).
    7. The model's forward with the head: the loss and the head's metrics as device sums
       (`FusedHeadOutput.metric_sums`: `num_tokens`, the token means' sums, `(sum, count)` pairs of the metrics with
       their own count, such as PoFT's per-sequence means).
    8. `_log_head_metrics(mode, metric_sums, inputs, extra_columns)`: reduces them over the processes and appends the
       step's values to `self._metrics[mode]` without a host sync; a subclass may replace an entry of `metric_sums`
       first (TL reports the raw PKT weights instead of the normalised ones the head saw) and call the parent.
When TRL logs (`log`), the pending device values are read back at once and TRL averages them as usual.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from trl import SFTTrainer

from ..data import DataCollatorWithExtraColumns
from ..data.packing import pack_with_columns
from ..modeling import PREPENDING_PEFT_TYPES, LossHead, add_loss_head_forward, forward_with_head
from ..ops.method import LossMethod
from ..utils import destroy_process_group_at_exit
from .args_coercion import coerce_args
from .chat_template_setup import use_training_chat_template
from .fused_sft_config import FusedSFTConfig
from .metric_logging import read_on_host, reduce_head_metrics
from .model_card import ModelCardMixin


# TRL's `loss_type` names mapped to the fused head's method names
_LOSS_TYPE_TO_METHOD = {"nll": "sft", "dft": "dft"}


class FusedSFTTrainer(ModelCardMixin, SFTTrainer):
    """
    Drop-in replacement for `trl.SFTTrainer` whose loss head never materialises the logits.

    It takes exactly the arguments of `SFTTrainer` (pass a [`FusedSFTConfig`] as `args` to choose the loss backend);
    `loss_type="nll"` and `"dft"` give the same losses as `SFTTrainer`, step for step.

    Subclasses that need more than the labels set:
        token_columns (`dict[str, float]`): per-token dataset columns the collator keeps, with their padding value;
            packing moves them with their tokens;
        example_columns (`tuple[str, ...]`): per-example dataset columns the collator keeps; packed or padding-free
            batches bring them per token (`hf_plugins.data.packing.sequence_values` reads one per sequence);
    and override `loss_method` and `loss_method_inputs` (and `whole_sequence_loss` for a per-sequence loss). The
    module docstring lists the hooks in the order they run and what each receives.
    """

    _tag_names = ["trl", "sft", "hf-plugins"]
    _name = "Fused SFT"

    token_columns: dict[str, float] = {}
    example_columns: tuple[str, ...] = ()

    #: The config class of this trainer; `args` of another class are converted to it
    config_class = FusedSFTConfig
    #: `hf-plugins <command>` trains with this trainer; `description` is its line in `hf-plugins --help`. Every trainer
    #: of `hf_plugins.trainers.TRAINERS` sets both itself.
    command = "sft"
    description = "SFT (loss_type nll) or DFT (loss_type dft) with the fused loss head"
    #: What `hf-plugins <command>` checks in the dataset before the model loads, beyond TRL's SFT formats: the keyword
    #: arguments of `hf_plugins.cli_checks.check_dataset_format` (`conversations_only`, `required_columns` with how to
    #: add each, `tokenized_columns`)
    dataset_needs: dict = {}
    #: Why the method fine-tunes every weight (the command then refuses `--use_peft` and quantised loading); None
    #: when adapters and quantised models train as with `SFTTrainer`
    full_fine_tuning: str | None = None

    @classmethod
    def coerce_args(cls, model, args):
        """`args` as an instance of `config_class`: a default one named after the model when None; another config
        (a plain `SFTConfig`, `TrainingArguments`) keeps its values and the method's fields take their defaults."""
        return coerce_args(
            cls.config_class,
            cls.__name__,
            model,
            args,
            "The positional order is SFTTrainer's: pass other objects by keyword (e.g. a reference model as the "
            "keyword argument `ref_model=` of ASFTTrainer).",
        )

    def __init__(self, model, args: FusedSFTConfig | None = None, *positional, **kwargs):
        args = self.coerce_args(model, args)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                f"`compute_loss_func` cannot be used with {type(self).__name__}: the trainer computes the loss with "
                "its fused head. Subclass it and override `loss_method` to change the loss."
            )
        self._label_smoothing = self._check_label_smoothing(args)
        self._check_packing_strategy(args)
        if self.token_columns or self.example_columns:
            # TRL drops every column the model's forward does not name; ours must reach the collator
            args.remove_unused_columns = False
        # Known templates without generation markers get their training version before TRL judges the template
        with use_training_chat_template(model, args, positional, kwargs) as (positional, kwargs):
            with warnings.catch_warnings():
                # SFTTrainer warns that label smoothing costs an extra forward that builds the full logits: not
                # here, the fused head smooths
                warnings.filterwarnings("ignore", "`label_smoothing_factor` is deprecated", FutureWarning)
                super().__init__(model, args, *positional, **kwargs)
        destroy_process_group_at_exit()

        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError(
                f"{type(self).__name__} does not support sequence parallelism (`sp_size > 1`) yet: its loss is not "
                "the model's own NLL that the sequence-parallel engine reduces."
            )
        self._check_prompt_learning(parallelism)

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._check_loss_backend(base)
        add_loss_head_forward(base)
        if self.token_columns or self.example_columns:
            self.data_collator = DataCollatorWithExtraColumns(
                self.data_collator,
                token_columns=dict(self.token_columns),
                example_columns=tuple(self.example_columns),
                # TRL's own choice: `padding_free`, or packing with a strategy that keeps sequence boundaries
                padding_free=bool(self.padding_free),
            )

    # ------------------------------------------------------------------ hooks for method trainers
    def loss_method(self) -> str | LossMethod:
        """The fused head's method for this trainer (from `loss_type` here)."""
        return _LOSS_TYPE_TO_METHOD[self.args.loss_type]

    def loss_method_inputs(
        self, model, inputs: dict[str, Any], extra_columns: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, Any]]:
        """The method's inputs for one batch, as `LossHead` input groups: a dict with any of
        `"token_inputs"` (`[B, T]` tensors aligned with `input_ids`, shifted like the labels),
        `"hidden_inputs"` (`[B, T, D]` tensors such as a reference model's hidden states, shifted like the hidden
        states) and `"other_inputs"` (per-sequence tensors, scalars, weights: passed as they are).

        Args:
            model: the model being trained (wrapped as the trainer runs it), e.g. to run a reference through it.
            inputs: this call's own shallow copy of the batch the model's forward gets, without the extra columns;
                replacing an entry (e.g. the labels) changes what the forward sees.
            extra_columns: the batch's `token_columns` and `example_columns`, as the collator gave them.

        Here: label smoothing for `loss_type="nll"` with `label_smoothing_factor > 0`."""
        if self._label_smoothing:
            return {"other_inputs": {"label_smoothing": self._label_smoothing}}
        return {}

    def _check_label_smoothing(self, args) -> float:
        """The label smoothing the loss applies: `label_smoothing_factor` for `loss_type="nll"`, as TRL's SFTTrainer
        applies transformers' `LabelSmoother` (the same target, `(1 - eps) * one_hot(y) + eps / V`, built in the
        fused head); none for `"dft"`, which SFTTrainer trains unsmoothed. Refused for trainers that replace the
        loss, whose targets label smoothing is not defined for."""
        eps = args.label_smoothing_factor
        if eps == 0:
            return 0.0
        if not 0 < eps <= 1:
            raise ValueError(
                f"`label_smoothing_factor={eps}` must be in [0, 1]: the share of each token's target spread evenly "
                "over the vocabulary (0: none)."
            )
        if type(self).loss_method is not FusedSFTTrainer.loss_method:
            raise ValueError(
                f"`label_smoothing_factor={eps}` cannot be used with {type(self).__name__}: label smoothing is "
                "defined for the cross-entropy of `loss_type='nll'` (as in TRL's SFTTrainer), and this trainer "
                "replaces that loss with its method's own targets. Set `label_smoothing_factor=0`."
            )
        if args.loss_type != "nll":
            warnings.warn(
                f"`label_smoothing_factor={eps}` is ignored with `loss_type={args.loss_type!r}`: TRL's SFTTrainer "
                "smooths only `loss_type='nll'` and trains DFT unsmoothed, and so does this trainer.",
                UserWarning,
                stacklevel=3,
            )
            return 0.0
        return float(eps)

    def whole_sequence_loss(self, args) -> str | None:
        """For trainers whose loss needs each sequence whole (a per-sequence mean or weight): why, as a phrase
        naming any setting that lifts it; packing strategies that cut sequences into pieces are then refused.
        None (here): the loss is a sum over tokens, so any packing gives the loss of the packed tokens."""
        return None

    def _check_packing_strategy(self, args) -> None:
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        reason = self.whole_sequence_loss(args) if (args.packing or eval_packing) else None
        if reason is None:
            return
        if args.packing_strategy != "bfd":
            raise ValueError(
                f"`packing_strategy={args.packing_strategy!r}` cuts sequences into pieces, but "
                f"{type(self).__name__} needs each sequence whole ({reason}): set `packing_strategy='bfd'` (whole "
                "sequences, truncated to `max_length`) or `packing=False`."
            )
        if eval_packing and not args.packing:
            # TRL's collator keeps packed sequences apart (padding-free, position ids) only when training packs too
            raise ValueError(
                f"`eval_packing=True` with `packing=False` collates the packed evaluation rows as padded rows, which "
                f"lose their sequence boundaries, but {type(self).__name__} needs each sequence whole ({reason}): "
                "set `eval_packing=False`, or pack the training data too (`packing=True`)."
            )

    def _check_prompt_learning(self, parallelism) -> None:
        """Prompt-learning PEFT works as in TRL (the head aligns the virtual tokens, see `hf_plugins.modeling`), except where
        the positions cannot be aligned or PEFT computes the loss itself."""
        peft_type = getattr(getattr(self.model, "active_peft_config", None), "peft_type", None)
        peft_type = getattr(peft_type, "value", peft_type)  # PEFT's `PeftType` enum: its value is the name
        if peft_type == "CPT":
            raise ValueError(
                f"{type(self).__name__} does not support CPT (`CPTConfig`): PEFT computes CPT's loss itself from the "
                "full logits, which the fused head never builds (stock SFTTrainer fails on it too). Use prompt "
                "tuning, p-tuning, prefix tuning or LoRA."
            )
        context_parallel = parallelism is not None and getattr(parallelism, "cp_enabled", False)
        if peft_type in PREPENDING_PEFT_TYPES and context_parallel:
            raise ValueError(
                f"{type(self).__name__} cannot train {peft_type} with context parallelism (`cp_size > 1`): the "
                "virtual tokens PEFT prepends to each shard cannot be aligned with the pre-shifted labels. Use prefix "
                "tuning or LoRA, or train without context parallelism."
            )

    def _check_loss_backend(self, base_model) -> None:
        """Refuse a GPU backend the machine or the method cannot run, before training starts; with `"liger"`, apply
        Liger's model patches (its loss head is the one part of Liger we do not use: ours replaces it)."""
        backend = self.args.loss_backend
        if backend not in ("triton", "liger"):
            return
        from ..ops.liger import LIGER_METHODS, apply_liger_model_patches, liger_available
        from ..utils import interpreter_enabled, triton_usable

        device = self.args.device
        if not triton_usable(device):
            raise ValueError(
                f"`loss_backend={backend!r}` needs a CUDA device with triton (the trainer runs on {device.type}): set "
                "`loss_backend='auto'` (it picks the fastest backend the device has) or 'chunked'."
            )
        if backend == "liger":
            if not liger_available():
                raise ValueError(
                    "`loss_backend='liger'` needs liger-kernel: `pip install liger-kernel`, or use 'triton'."
                )
            method = self.loss_method()
            name = method if isinstance(method, str) else method.name
            if name not in LIGER_METHODS:
                raise ValueError(
                    f"`loss_backend='liger'` covers the losses {', '.join(LIGER_METHODS)}; {type(self).__name__} "
                    f"trains with {name!r}: use `loss_backend='triton'` (or 'auto')."
                )
            if device.type == "cuda" and not interpreter_enabled():
                apply_liger_model_patches(base_model)

    # ------------------------------------------------------------------ TRL/transformers plumbing
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = [*self.token_columns, *self.example_columns]
        if not (packing and columns):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        # TRL packs `input_ids` and `labels` alone: prepare the rows as TRL does, unpacked and not truncated (packing
        # truncates), then pack them with the method's columns
        unpacked = copy.copy(args)
        unpacked.max_length, unpacked.shuffle_dataset = None, False
        dataset = super()._prepare_dataset(dataset, processing_class, unpacked, False, formatting_func, dataset_name)
        return pack_with_columns(dataset, args, list(self.token_columns), list(self.example_columns), dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [name for name in (*self.token_columns, *self.example_columns) if name not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    def trained_sequences(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """For trainers whose loss is a mean over sequences (PoFT, TL-Training's "sample" weights): `[B]` bool, the
        sequences of `batch` that have a trained token; the loss is then divided by the global count of those
        (under gradient accumulation and data parallelism) instead of the token count. None (here): tokens."""
        return None

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        trained = [self.trained_sequences(batch) for batch in batch_samples]
        if any(t is None for t in trained):
            return super()._get_num_items_in_batch(batch_samples, device)
        # The number of sequences instead of tokens: one stand-in label per trained sequence, so that the parent's
        # gathering across processes and its parallelism divisors apply unchanged
        stand_ins = []
        for sequences in trained:
            labels = torch.full((sequences.shape[0], 2), -100, dtype=torch.long, device=sequences.device)
            labels[:, 1] = torch.where(sequences, 0, -100)  # not `labels[sequences, 1]`: a boolean index syncs
            stand_ins.append({"labels": labels})
        return super()._get_num_items_in_batch(stand_ins, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The trainer's count spans every rank and accumulation step; without it (evaluation, a direct call) the
        # loss is this batch's own
        global_count = num_items_in_batch is not None
        if not global_count:
            trained = self.trained_sequences(inputs)
            if trained is not None:
                num_items_in_batch = int(trained.sum())  # this batch's sequences
        return self._compute_head_loss(model, inputs, return_outputs, num_items_in_batch, global_count)

    def _compute_head_loss(
        self, model, inputs, return_outputs, num_items_in_batch, global_count: bool, layer_hidden_states=None
    ):
        """The loss of one batch through the fused head (and with `return_outputs`, the logits of an extra forward).
        With `layer_hidden_states` (hidden-state indices, see `hf_plugins.modeling.LossHead`), `(loss, states)`: the
        same forward also returns those layers' hidden states, for a method that regularises them (LfU)."""
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        columns = (*self.token_columns, *self.example_columns)
        extra_columns = {name: inputs.pop(name) for name in columns if name in inputs}
        inputs["use_cache"] = False
        input_groups = self.loss_method_inputs(model, inputs, extra_columns)
        if self.aux_loss_enabled:
            # MoE models: the router logits for the load-balancing loss (TRL passes the flag, which vision-language
            # wrappers honour only as a forward argument)
            inputs["output_router_logits"] = True
        head = LossHead(
            method=self.loss_method(),
            backend=self.args.loss_backend,
            chunk_size=self.args.loss_chunk_size,
            num_items_in_batch=num_items_in_batch,
            layer_hidden_states=layer_hidden_states,
            **input_groups,
        )
        outputs = forward_with_head(model, inputs, head)
        loss = outputs.loss
        # Like `Trainer.compute_loss`: `num_items_in_batch` counts the tokens of every rank and DDP averages the
        # gradients across ranks, so the sum is scaled back up by the number of data-parallel ranks
        if self.args.average_tokens_across_devices and global_count:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            # As SFTTrainer: the aux loss is a per-micro-batch mean that DDP averages across ranks; with the global
            # count, gradient accumulation is left to the loss, so it is averaged over the accumulation steps
            steps = self.current_gradient_accumulation_steps if global_count else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean()
            self._metrics[mode]["aux_loss"].append(aux_loss)  # read at `log`

        self._log_head_metrics(mode, outputs.metric_sums, inputs, extra_columns)

        if layer_hidden_states is not None:
            return loss, outputs.layer_hidden_states
        if return_outputs:
            warnings.warn(
                "`return_outputs=True` (used for `compute_metrics` / `preprocess_logits_for_metrics`) runs an extra "
                "forward pass that builds the full logits.",
                stacklevel=2,
            )
            with torch.no_grad():
                logits_outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, logits_outputs
        return loss

    def _log_head_metrics(
        self, mode: str, metric_sums: dict[str, Any], inputs: dict[str, Any], extra_columns: dict[str, torch.Tensor]
    ) -> None:
        """The head's metrics (`FusedHeadOutput.metric_sums`) as means over every process, under TRL's metric names
        (`entropy`, `mean_token_accuracy`): token means weighted by each process's tokens, metrics with their own
        count (e.g. PoFT's per-sequence means) weighted by it. `inputs` and `extra_columns` are the batch as
        `loss_method_inputs` left them. Appended as device values, read when TRL logs: no host sync per step."""
        for name, value in reduce_head_metrics(self.accelerator, metric_sums).items():
            self._metrics[mode][name].append(value)

        if mode == "train":
            # Same count as SFTTrainer: every real token of the batch, prompt included
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                local_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in the batch.")
            # A device tensor after the first step (TRL keeps an int and syncs each step for it)
            tokens = self.accelerator.gather_for_metrics(local_tokens).sum() // self._tp_size
            self._total_train_tokens = self._total_train_tokens + tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The steps' metrics are device values until here: read them all at once, then TRL averages them
        read_on_host(self._metrics["train" if self.model.training else "eval"])
        super().log(logs, start_time)
