"""One conversion of a trainer's `args` into its own config class, for every trainer of the library."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments


def default_output_dir(model, trainer_name: str) -> str:
    """The output folder a trainer names for `args=None`, as TRL's trainers do: `<model name>-<trainer name>`."""
    model_name = model if isinstance(model, str) else model.config._name_or_path
    return f"{model_name.split('/')[-1]}-{trainer_name}"


def init_values(args: TrainingArguments) -> dict[str, Any]:
    """The constructor arguments of a config, copied field by field: `to_dict()` would replace secrets such as
    `hub_token` with placeholders."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}


def coerce_args(config_class: type, trainer_name: str, model, args, positional_order: str, drop=()):
    """`args` as an instance of `config_class`: a default one named after the model when None; another config (a
    plain TRL config, `TrainingArguments`) keeps its values and the fields it lacks take their defaults. `drop` names
    fields that the other config's `__post_init__` derived and that `config_class` derives again. Anything else is
    refused, naming the positional order (`positional_order`) that a misplaced argument suggests was mistaken."""
    if args is None:
        return config_class(default_output_dir(model, trainer_name))
    if isinstance(args, config_class):
        return args
    if not isinstance(args, TrainingArguments):
        raise ValueError(
            f"`args` must be a {config_class.__name__} (or a TRL/transformers config), got {type(args).__name__}. "
            f"{positional_order}"
        )
    values = init_values(args)
    for name in drop:
        values.pop(name, None)
    return config_class(**values)
