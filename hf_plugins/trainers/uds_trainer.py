"""UDS online batch selection as a trainer hook: `UDSMixin` and `with_uds(TrainerClass or ConfigClass)`.

A callback never sees the batches, so UDS needs one trainer hook: `get_batch_samples`, where transformers' training
loop fetches the micro-batches of one optimizer step (the gradient-accumulation window) before training on them. The
mixin scores every candidate micro-batch of the window there (one no-grad forward to the final hidden states, no
logits), keeps the selected examples, and only then counts `num_items_in_batch`, so the loss is normalised by the
supervised tokens of the *selected* examples of the whole window (across processes with
`average_tokens_across_devices`): exactly the normalisation of training on the selected examples alone. The model
does not change within a window, so scoring all of its micro-batches before training on the first one gives the
same selection as scoring each just before its own step (the reference's order); the memory is updated micro-batch
by micro-batch in both.

The state (sketch constants, memory, pointer, random generator) lives in `UDSCallback`; the mixin writes it into every
checkpoint next to Trainer's RNG states and restores it before the first batch of a resumed run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import SFTConfig, SFTTrainer

from ..callbacks.uds import DEFAULT_SKETCH_LENGTH, UDSCallback, UDSSettings, settings_from_config
from ..modeling import (
    add_loss_head_forward,
    forward_hidden_states,
    gather_lm_head,
    lm_head_parameters,
    logit_transform,
)
from ..utils import destroy_process_group_at_exit
from .args_coercion import default_output_dir, init_values
from .option_classes import class_with_options
from .uds_config import UDSConfig


# Keys of a batch that are not model inputs for the scoring forward
_NOT_MODEL_INPUTS = ("labels", "shift_labels")


class UDSMixin:
    """
    Trainer mixin for UDS (Utility-Diversity Sampling, arXiv 2510.16882) online batch selection: from each candidate
    micro-batch of `per_device_train_batch_size` (B) examples, train only on the `uds_keep` (K) with the largest
    `||logits_i||_* + uds_alpha * mean_q ||sketch_i - q||`, and add their sketches to a FIFO memory. Build the trainer
    with `with_uds(TrainerClass)` (e.g. `with_uds(FusedSFTTrainer)`, `with_uds(ASFTTrainer)`, `with_uds(SFTTrainer)`)
    and give it a config with the [`UDSConfig`] fields (`with_uds(ConfigClass)`; a config without them is converted
    and gets UDS's defaults).

    Scoring runs one extra no-grad forward on the B candidates to the final hidden states; neither score builds the
    logits (see `hf_plugins.losses.uds`). Logged metrics: `uds/utility` and `uds/diversity` (means over the scored
    candidates of all processes), `uds/selected_fraction` (examples trained on / candidates seen).

    Under DDP each process selects from its own micro-batch into its own memory, as the reference does; each
    process's state is saved in `uds_state_<rank>.pt`.

    Attributes:
        uds_callback ([`UDSCallback`]): the callback that holds the selection state.
    """

    uds_callback: UDSCallback

    def __init__(self, model, args=None, *positional, **kwargs):
        args = self._uds_coerce_args(model, args)
        super().__init__(model, args, *positional, **kwargs)
        # Also for stock trainers made UDS (`with_uds(SFTTrainer)`), whose constructor does not register it
        destroy_process_group_at_exit()
        self._uds_setup()

    # ------------------------------------------------------------------ set-up
    @classmethod
    def _uds_coerce_args(cls, model, args):
        if hasattr(cls, "coerce_args"):  # the FusedSFTTrainer family: its config_class carries the UDS fields
            return cls.coerce_args(model, args)
        if isinstance(args, UDSConfig):
            return args
        if args is None:
            return with_uds(SFTConfig)(default_output_dir(model, cls.__name__))
        if not isinstance(args, TrainingArguments):
            raise ValueError(
                f"`args` must be a trainer config (e.g. `with_uds(SFTConfig)(...)`), got {type(args).__name__}."
            )
        base = type(args)
        if issubclass(cls, SFTTrainer) and not isinstance(args, SFTConfig):
            base = SFTConfig
        names = {f.name for f in dataclasses.fields(base) if f.init}
        values = {name: value for name, value in init_values(args).items() if name in names}
        return with_uds(base)(**values)

    def _uds_setup(self) -> None:
        settings = settings_from_config(self.args)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, UDSCallback)]
        if len(callbacks) > 1:
            raise ValueError("Pass at most one UDSCallback: the trainer selects with one state.")
        if callbacks:
            callback = callbacks[0]
            for field in dataclasses.fields(UDSSettings):
                mine, theirs = getattr(settings, field.name), getattr(callback.settings, field.name)
                if mine != theirs:
                    raise ValueError(
                        f"The UDSCallback passed in `callbacks` has {field.name}={theirs!r} but the config has "
                        f"`uds_{field.name}={mine!r}`: set the `uds_*` fields of the config (the trainer creates the "
                        "callback from them), or build the callback with `UDSCallback.from_config(args)`."
                    )
        else:
            callback = UDSCallback(settings)
            self.add_callback(callback)
        callback.trainer_attached = True
        self.uds_callback = callback

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # The logits UDS scores are the model's own: soft-capped or scaled where its config says so
        self._uds_logit_transform = logit_transform(base)
        add_loss_head_forward(base)
        weight, _ = lm_head_parameters(base.get_output_embeddings())
        vocab_size = int(getattr(weight, "ds_shape", weight.shape)[0])
        length = settings.sketch_length or getattr(self.args, "max_length", None) or DEFAULT_SKETCH_LENGTH
        seed = settings.seed if settings.seed is not None else self.args.seed
        # The devices the model's dropout draws from when it scores (more than the trainer's under a device map)
        model_devices = {p.device for p in self.model.parameters()}
        callback.setup(vocab_size, length, self.accelerator.device, self.args.process_index, seed, model_devices)

    # ------------------------------------------------------------------ the hook
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if batches:
            if self.state.global_step >= self.uds_callback.settings.start_step:
                batches = self._uds_select(batches)
            else:
                self._metrics["train"]["uds/selected_fraction"].append(1.0)
        # Counted after the selection: the loss is normalised by the supervised tokens that are trained on
        return batches, self._get_num_items_in_batch(batches, device)

    def _uds_select(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        callback = self.uds_callback
        random_mode = callback.settings.mode == "random"
        # utility sum, diversity sum, scored candidates, candidates, selected
        stats = torch.zeros(5, dtype=torch.float64, device=self.accelerator.device)
        selected = []
        for batch in batches:
            batch = self._prepare_inputs(batch)
            self._uds_check_batch(batch)
            size = batch["input_ids"].shape[0]
            if random_mode:
                selection = callback.select_random(size)
            else:
                hidden, weight, bias = self._uds_hidden_states(batch)
                with gather_lm_head(weight, bias):
                    utility, diversity, sketch = callback.score(
                        hidden,
                        weight,
                        bias,
                        batch.get("attention_mask"),
                        self.state.global_step,
                        self._uds_logit_transform,
                    )
                selection = callback.select_from_scores(utility, diversity, sketch)
                stats[0] += utility.sum()
                stats[1] += diversity.sum()
                stats[2] += size
            stats[3] += size
            stats[4] += selection.indices.numel()
            selected.append(self._uds_subset(batch, selection.indices))
        total = self.accelerator.gather(stats[None]).sum(0).tolist()
        metrics = self._metrics["train"]
        if total[2] > 0:
            metrics["uds/utility"].append(total[0] / total[2])
            metrics["uds/diversity"].append(total[1] / total[2])
        metrics["uds/selected_fraction"].append(total[4] / total[3])
        return selected

    def _uds_check_batch(self, batch: dict[str, Any]) -> None:
        if "input_ids" not in batch:
            raise ValueError("UDS needs `input_ids` in every batch (a text batch of shape [B, N]).")
        if any(key in batch for key in ("cu_seq_lens_q", "seq_lengths", "seq_idx")) or (
            "position_ids" in batch and "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        ):
            raise ValueError(
                "UDS got a packed / padding-free batch (all examples in one row), in which examples cannot be scored "
                "one by one: set `packing=False` and `padding_free=False`."
            )

    @torch.no_grad()
    def _uds_hidden_states(self, batch: dict[str, Any]):
        """The candidates' final hidden states [B, N, D] and the lm_head, from one no-grad forward in training mode
        (as the reference scores), its dropout drawn from UDS's own random stream (saved in checkpoints; the global
        one, which the training forward draws from, is left untouched, so resuming is exact). Under FSDP / ZeRO-3
        through the wrapped model, so parameters are gathered; else through the unwrapped one (no DDP hooks for a
        pass without backward)."""
        extra = (*getattr(self, "token_columns", {}), *getattr(self, "example_columns", ()))
        inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS and k not in extra}
        inputs["use_cache"] = False
        sharded = self.is_fsdp_enabled or is_deepspeed_zero3_enabled()
        model = self.model_wrapped if sharded else self.model
        model.train()
        with self.compute_loss_context_manager(), self.uds_callback.scoring_stream.active():
            outputs = forward_hidden_states(model, inputs)
        # Prompt tuning / p-tuning prepend virtual tokens: `forward_hidden_states` returns the examples' own
        # positions only (whose states attend to the virtual ones), the positions the loss is computed on
        return outputs.hidden_states, outputs.weight, outputs.bias

    def _uds_subset(self, batch: dict[str, Any], indices: torch.Tensor) -> dict[str, Any]:
        """The selected rows of every per-example entry, with the padding columns no selected example needs removed
        (right padding: trailing columns that are padding in every kept row)."""
        size, length = batch["input_ids"].shape[:2]
        subset = {}
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == size:
                subset[key] = value.index_select(0, indices.to(value.device))
            elif isinstance(value, list) and len(value) == size:
                subset[key] = [value[i] for i in indices.tolist()]
            else:
                subset[key] = value
        mask = subset.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] == length:
            used = mask.bool().any(0).nonzero()
            keep = int(used[-1].item()) + 1 if used.numel() else length
            multiple = getattr(self.args, "pad_to_multiple_of", None)
            if multiple:
                keep = min(length, -(-keep // multiple) * multiple)
            if keep < length:
                for key, value in subset.items():
                    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == length:
                        subset[key] = value[:, :keep]
        return subset

    # ------------------------------------------------------------------ state in checkpoints
    def _save_rng_state(self, output_dir: str) -> None:
        # Called on every process in every full checkpoint, with the RNG states: UDS's state travels with them
        super()._save_rng_state(output_dir)
        self.uds_callback.save(output_dir, self.args.process_index, self.args.world_size)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Called when resuming, before the first batch is fetched (Trainer restores its RNG states only after the
        # first window has been fetched, too late for a selection made while fetching it)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.uds_callback.load(checkpoint, self.args.process_index, self.args.world_size)


# ---------------------------------------------------------------------------------------------------- with_uds


def _rebuild_uds_config(base: type, state: dict[str, Any]):
    cls = with_uds(base)
    config = cls.__new__(cls)
    config.__dict__.update(state)
    return config


def _reduce_uds_config(self):
    # The class is made at run time: pickle (torch.save of the training arguments) stores its base class instead
    return _rebuild_uds_config, (type(self)._uds_base, dict(self.__dict__))


def with_uds(cls: type) -> type:
    """The UDS version of a trainer class (`with_uds(ASFTTrainer)`: a subclass with [`UDSMixin`]) or of a config
    class (`with_uds(ASFTConfig)`: a dataclass with the [`UDSConfig`] fields added). A trainer's UDS version takes
    the UDS version of its config as `config_class`. Classes that already have UDS are returned as they are; the
    same class is returned for the same argument. Only SFT classes (`SFTTrainer`, `SFTConfig` and their subclasses)
    are accepted: a `ValueError` for any other (e.g. `GRPOTrainer`)."""
    if not isinstance(cls, type):
        raise ValueError(f"`with_uds` takes a trainer or config class, got {cls!r}.")
    if issubclass(cls, (UDSMixin, UDSConfig)):
        return cls
    for base, kind in ((Trainer, SFTTrainer), (TrainingArguments, SFTConfig)):
        # UDS selects examples of supervised batches before the loss; other trainers (GRPO's generated groups
        # among them) have no such step yet, and a mixed class would fail in its constructor or train wrongly
        if issubclass(cls, base) and not issubclass(cls, kind):
            raise ValueError(
                f"`with_uds` takes an SFT {'trainer' if base is Trainer else 'config'} class (`trl.{kind.__name__}` "
                f"or a subclass, e.g. `FusedSFT{kind.__name__[3:]}`); {cls.__name__} is not one: UDS online batch "
                "selection has no form for other trainers yet."
            )
    return class_with_options(
        cls,
        option="UDS",
        fields=UDSConfig,
        mixin=UDSMixin,
        reduce=_reduce_uds_config,
        module=__name__,
        trainer_doc="UDS online batch selection",
        wrap=with_uds,
    )
