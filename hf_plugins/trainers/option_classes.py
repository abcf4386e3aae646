"""The classes `with_uds` and `with_hft` make: a trainer or config class with an option group mixed in.

An option group is a mixin for trainers (`UDSMixin`, `HFTMixin`) and a dataclass of config fields (`UDSConfig`,
`HFTConfig`); `with_<option>(SomeTrainer)` is a subclass of both the mixin and the trainer, whose `config_class` is
`with_<option>(SomeTrainer.config_class)`, the config with the option's fields added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from transformers import Trainer, TrainingArguments


# one class per (option, base class): `with_uds(X) is with_uds(X)`, so isinstance checks and pickling by the
# rebuilt class agree however often the class is asked for
_MADE: dict[tuple[str, type], type] = {}


def class_with_options(
    cls: type,
    *,
    option: str,
    fields: type,
    mixin: type,
    reduce: Callable,
    module: str,
    trainer_doc: str,
    wrap: Callable[[type], type],
) -> type:
    """`cls` (a transformers/TRL trainer or config class) with the option group `option` ("UDS", "HFT") mixed in;
    the same class object for the same `option` and `cls` every time.

    Parameters:
        cls (`type`): the trainer or config class.
        option (`str`): the option's name: the prefix of the new class's name, its model-card tag (lower-cased) and
            the name of the attribute (`_<option>_base`, lower-cased) through which a config's `reduce` finds `cls`.
        fields (`type`): the dataclass of the option's config fields.
        mixin (`type`): the option's trainer mixin.
        reduce (`Callable`): the config class's `__reduce__`: classes made at run time cannot be pickled by name.
        module (`str`): the `__module__` of the new class.
        trainer_doc (`str`): what the option does, for the trainer class's docstring.
        wrap (`Callable`): `with_<option>`, applied to a trainer's `config_class`.
    """
    if (option, cls) in _MADE:
        return _MADE[option, cls]
    name = f"{option}{cls.__name__}"
    attrs = {"__module__": module, "__qualname__": name}
    if issubclass(cls, TrainingArguments):
        attrs.update(
            __doc__=f"`{cls.__name__}` with the {option} fields of [`{fields.__name__}`].",
            __reduce__=reduce,
            **{f"_{option.lower()}_base": cls},
        )
        made = dataclasses.dataclass(type(name, (fields, cls), attrs))
    elif issubclass(cls, Trainer):
        attrs.update(
            __doc__=f"`{cls.__name__}` with {trainer_doc} ([`{mixin.__name__}`]).",
            _tag_names=[*getattr(cls, "_tag_names", []), option.lower()],
        )
        if hasattr(cls, "config_class"):
            attrs["config_class"] = wrap(cls.config_class)
        made = type(name, (mixin, cls), attrs)
    else:
        raise ValueError(
            f"`with_{option.lower()}` takes a transformers/TRL trainer class or a config class, got {cls.__name__}."
        )
    _MADE[option, cls] = made
    return made
