"""Swap a shipped training chat template in before `SFTTrainer.__init__` checks the template.

TRL decides in `SFTTrainer.__init__` whether the template is training-compatible (`get_training_chat_template`, called
from the trainer module with no extension point) and raises "patching is not supported for this template" for the
families it does not know. So the swap happens just before: when assistant-only loss is on and the template TRL will
see is exactly an original of `hf_plugins.chat_templates`, its training version takes its place; when no template can
be found, a one-line error says what to do, before the model is loaded.

- No `chat_template_path`: the tokenizer's template is judged. A swapped-in template stays on the tokenizer, so it is
  saved with the model: it renders what the original renders, and the tool calls the model was trained on.
- `chat_template_path` naming a shipped template (`"smollm2"`), or a `.jinja` file holding a known original: TRL
  reads the shipped training file instead, for the duration of `__init__` (the config keeps what the user wrote).
- `chat_template_path` naming a model to clone the template from: left to TRL.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..chat_templates import find_shipped_template, missing_template_message, template_path, training_chat_template


# SFTTrainer(model, args, data_collator, train_dataset, eval_dataset, processing_class, ...): its index in the
# positional arguments after `model` and `args`
_PROCESSING_CLASS_POSITION = 3


def _load_processing_class(model, args):
    """The processing class SFTTrainer would load for `model` when none is given (its own rule), or None if it
    cannot be loaded here (TRL then reports the problem itself)."""
    from transformers import AutoProcessor
    from trl.trainer.utils import get_config_model_id

    if isinstance(model, str):
        model_id, revision = model, (args.model_init_kwargs or {}).get("revision")
    else:
        model_id, revision = get_config_model_id(model.config), None
    if not model_id:
        return None
    try:
        return AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        return None


def _shipped_file(chat_template_path: str) -> str | None:
    """The shipped training template `chat_template_path` names, unless it is an existing file or folder or a Hub
    repo id (`org/name`), which TRL copies the template from."""
    if os.path.exists(chat_template_path) or "/" in chat_template_path or os.sep in chat_template_path:
        return None
    try:
        return str(template_path(chat_template_path))
    except ValueError:
        return None


@contextmanager
def use_training_chat_template(model, args, positional: tuple, kwargs: dict):
    """Around `SFTTrainer.__init__(model, args, *positional, **kwargs)`: yields the `(positional, kwargs)` to call it
    with, the processing class (loaded here when none is given) carrying the training template if one was swapped
    in. Does nothing without `assistant_only_loss`."""
    if not args.assistant_only_loss:
        yield positional, kwargs
        return
    positional, kwargs = list(positional), dict(kwargs)
    if len(positional) > _PROCESSING_CLASS_POSITION:
        processing_class = positional[_PROCESSING_CLASS_POSITION]
    else:
        processing_class = kwargs.get("processing_class")
    if processing_class is None:
        processing_class = _load_processing_class(model, args)
        if processing_class is not None:
            if len(positional) > _PROCESSING_CLASS_POSITION:
                positional[_PROCESSING_CLASS_POSITION] = processing_class
            else:
                kwargs["processing_class"] = processing_class

    user_path = args.chat_template_path
    path = user_path
    if user_path is not None:
        path = _shipped_file(user_path) or user_path
        if processing_class is not None and os.path.isfile(path) and path.endswith((".jinja", ".j2")):
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            shipped = find_shipped_template(text)
            if shipped is not None:  # the file holds a known original: TRL reads its training version instead
                path = str(template_path(shipped.name))
            else:
                try:
                    training_chat_template(processing_class, text)
                except ValueError:
                    what = f"The template in `chat_template_path` ({user_path})"
                    raise ValueError(missing_template_message(what)) from None
    elif processing_class is not None:
        swapped = training_chat_template(processing_class)
        if swapped is not None:
            processing_class.chat_template = swapped

    args.chat_template_path = path
    try:
        yield tuple(positional), kwargs
    finally:
        args.chat_template_path = user_path
