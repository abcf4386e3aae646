"""HFT (Half Fine-Tuning) for any trainer: `HFTMixin` and `with_hft(TrainerClass or ConfigClass)`.

HFT needs no change to the loss or the step: it freezes half of the model before training (`apply_hft`). The mixin
applies it after the trainer's constructor has loaded the model and put any PEFT adapter on it, and before the
optimizer is built, so the optimizer holds the trainable half only; with `hft_redraw="epoch"` it builds the
optimizer over every tensor of the selection (frozen ones have no gradient, so the optimizer keeps no state for them)
and `HFTCallback` redraws per epoch. The selection's settings and draw are written into every checkpoint
(`hft_state.json`) and checked on resume.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from typing import Any

from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from ..callbacks.hft import HFTCallback, HFTSelector, apply_hft, check_redraw_possible
from .args_coercion import default_output_dir, init_values
from .hft_config import HFTConfig
from .option_classes import class_with_options
from .uds_trainer import with_uds


logger = logging.getLogger(__name__)

HFT_STATE_NAME = "hft_state.json"


class HFTMixin:
    """
    Trainer mixin for HFT (Half Fine-Tuning, arXiv 2404.18466): before training, freeze `hft_ratio` of each decoder
    layer's attention projections, feed-forward projections and norms at random (`apply_hft`), and train the rest.
    Build the trainer with `with_hft(TrainerClass)` (e.g. `with_hft(FusedSFTTrainer)`, `with_hft(SFTTrainer)`,
    `with_hft(DPOTrainer)`, `with_hft(GRPOTrainer)`) and give it a config with the [`HFTConfig`] fields
    (`with_hft(ConfigClass)`; a config without them is converted and gets HFT's defaults).

    With a PEFT adapter, half of the adapter modules are frozen by the same rule. With `hft_redraw="epoch"` a new
    selection is drawn at every epoch ([`HFTCallback`]); one process, no FSDP or DeepSpeed.

    Attributes:
        hft_selection ([`HFTSelection`]): the current selection (the frozen set).
        hft_callback ([`HFTCallback`]): the callback that keeps it.
    """

    hft_callback: HFTCallback

    def __init__(self, *positional, **kwargs):
        # `args` is not the second positional argument of every trainer (DPOTrainer's is `ref_model`): find it by name
        bound = inspect.signature(super().__init__).bind_partial(*positional, **kwargs)
        args = self._hft_coerce_args(bound.arguments.get("model"), bound.arguments.get("args"))
        bound.arguments["args"] = args
        super().__init__(*bound.args, **bound.kwargs)
        # read from the config given: a stock trainer may convert it to its own class (`SFTTrainer` a plain
        # `TrainingArguments`), which drops the `hft_*` fields
        self._hft_setup(args)

    @classmethod
    def _hft_coerce_args(cls, model, args):
        if hasattr(cls, "coerce_args"):  # the FusedSFTTrainer family: its config_class carries the HFT fields
            return cls.coerce_args(model, args)
        if isinstance(args, HFTConfig):
            return args
        if args is None and issubclass(cls, SFTTrainer):
            return with_hft(SFTConfig)(default_output_dir(model, cls.__name__))
        if not isinstance(args, TrainingArguments):
            raise ValueError(
                f"`args` must be a trainer config (e.g. `with_hft(DPOConfig)(...)`), got {type(args).__name__}."
            )
        base = type(args)
        names = {f.name for f in dataclasses.fields(base) if f.init}
        values = {name: value for name, value in init_values(args).items() if name in names}
        return with_hft(base)(**values)

    def _hft_setup(self, args) -> None:
        redraw = args.hft_redraw
        # an engine chosen by `accelerate launch` rather than by the config shows on the trainer only
        check_redraw_possible(self.args, redraw, fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled)
        seed = args.hft_seed if args.hft_seed is not None else args.seed
        given = getattr(self.model, "hft_selector", None)
        wanted = {"ratio": float(args.hft_ratio), "balance": args.hft_balance, "seed": seed}
        if given is not None and given.model is self.model and given.settings != wanted:
            raise ValueError(
                f"The model was given an HFT selection ({given.settings}) that differs from the config's `hft_ratio`, "
                f"`hft_balance`, `hft_seed` ({args.hft_ratio}, {args.hft_balance!r}, {seed}): set the fields, or pass "
                "the model without calling `apply_hft` (the trainer applies it)."
            )
        selection = apply_hft(self.model, ratio=args.hft_ratio, seed=seed, balance=args.hft_balance)
        selector: HFTSelector = self.model.hft_selector
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, HFTCallback)]
        if callbacks:
            raise ValueError("Do not pass an HFTCallback to a `with_hft` trainer: it makes its own from `hft_*`.")
        self.hft_callback = HFTCallback(selector, redraw)
        self.add_callback(self.hft_callback)
        logger.info(
            "HFT: %d of %d tensors frozen (%.1f%% of the %d parameters selected among)",
            len(selection.frozen),
            len(selector.managed),
            100 * selection.frozen_fraction,
            selection.managed_numel,
        )

    @property
    def hft_selection(self):
        return self.hft_callback.selector.selection

    def create_optimizer(self, model=None):
        # Redrawing can unfreeze any tensor of the selection: the optimizer must hold them all from the start
        selector = self.hft_callback.selector
        if self.optimizer is not None or self.hft_callback.redraw == "stage":
            return super().create_optimizer(model)
        selection = selector.selection
        selector.unfreeze_all()
        try:
            return super().create_optimizer(model)
        finally:
            selector.apply(selection)

    # ------------------------------------------------------------------ state in checkpoints
    def _hft_state(self) -> dict[str, Any]:
        selector = self.hft_callback.selector
        return {
            **selector.settings,
            "redraw": self.hft_callback.redraw,
            "draw": selector.selection.draw,
            "frozen": list(selector.selection.frozen),
        }

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            with open(os.path.join(output_dir, HFT_STATE_NAME), "w") as file:
                json.dump(self._hft_state(), file, indent=1)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, HFT_STATE_NAME) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        with open(path) as file:
            saved = json.load(file)
        selector = self.hft_callback.selector
        mine = {**selector.settings, "redraw": self.hft_callback.redraw}
        for key, value in mine.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"The checkpoint {checkpoint} was trained with HFT {key}={saved.get(key)!r}, the config has "
                    f"`hft_{key}={value!r}`: resume with the checkpoint's `hft_*` settings."
                )
        # The selection its optimizer state belongs to (the callback redraws from here at the next epoch)
        selector.apply(selector.draw(saved["draw"]))


# ---------------------------------------------------------------------------------------------------- with_hft


def _rebuild_hft_config(base: type, uds: bool, state: dict[str, Any]):
    cls = with_hft(with_uds(base) if uds else base)
    config = cls.__new__(cls)
    config.__dict__.update(state)
    return config


def _reduce_hft_config(self):
    # The class is made at run time: pickle (torch.save of the training arguments) stores its base class instead
    # (of `with_hft(with_uds(Config))`, the plain base and the UDS flag: UDS's class is made at run time too)
    base = type(self)._hft_base
    uds_base = getattr(base, "_uds_base", None)
    return _rebuild_hft_config, (uds_base or base, uds_base is not None, dict(self.__dict__))


def with_hft(cls: type) -> type:
    """The HFT version of a trainer class (`with_hft(DPOTrainer)`: a subclass with [`HFTMixin`]) or of a config class
    (`with_hft(DPOConfig)`: a dataclass with the [`HFTConfig`] fields added). A trainer's HFT version takes the HFT
    version of its config as `config_class`. Any transformers/TRL trainer or config is accepted; classes that already
    have HFT are returned as they are, and the same class is returned for the same argument. With UDS, apply
    `with_hft` last: `with_hft(with_uds(FusedSFTTrainer))`."""
    if not isinstance(cls, type):
        raise ValueError(f"`with_hft` takes a trainer or config class, got {cls!r}.")
    if issubclass(cls, (HFTMixin, HFTConfig)):
        return cls
    return class_with_options(
        cls,
        option="HFT",
        fields=HFTConfig,
        mixin=HFTMixin,
        reduce=_reduce_hft_config,
        module=__name__,
        trainer_doc="HFT, Half Fine-Tuning",
        wrap=with_hft,
    )
