"""Training-compatible chat templates, kept as `.jinja` files the way TRL keeps `trl/chat_templates`.

TRL's `assistant_only_loss=True` needs `{% generation %}` / `{% endgeneration %}` markers around what the assistant
writes, and TRL swaps in a training version for the templates it recognises exactly (`get_training_chat_template`:
Qwen2.5, Qwen3, Llama 3, Gemma, Phi-3, ...). This package adds the families TRL 1.16 does not patch that users of
these methods fine-tune: SmolLM2, SmolLM3, Llama 3.1 and 3.2, Mistral-7B-Instruct-v0.3, plus a tool-calling ChatML
form. Each training template renders exactly what its original renders, on every conversation the original can
render (tested), and adds the markers; some also render tool calls the original drops (see `README.md` here).

The trainers apply them by themselves (`FusedSFTTrainer`, so every trainer of the library): when the model's template
is exactly one of the originals below, its training version replaces it before TRL checks the template. A template
can also be chosen by name, `chat_template_path="smollm2"` (`--chat_template_path smollm2` on the CLI).

    from hf_plugins.chat_templates import load_template, training_chat_template

    tokenizer.chat_template = load_template("smollm2")     # by name
    template = training_chat_template(tokenizer)            # the swap the trainers make, or None if none is needed
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


__all__ = [
    "SHIPPED_TEMPLATES",
    "TEMPLATES_DIR",
    "ShippedTemplate",
    "find_shipped_template",
    "has_generation_markers",
    "load_template",
    "missing_template_message",
    "template_path",
    "training_chat_template",
]

#: The folder holding the `.jinja` files
TEMPLATES_DIR = Path(__file__).resolve().parent


@functools.cache
def _read(file_name: str) -> str:
    return (TEMPLATES_DIR / file_name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class ShippedTemplate:
    """A training template of this package and the original templates it replaces.

    Attributes:
        name: What `load_template` and `chat_template_path` accept (`"smollm2"`).
        models: The checkpoints whose template it is, for messages and docs.
        originals: File names (here) of the originals recognised exactly; empty for a template chosen by name only.
        trl_originals: Names of TRL's own copies of originals (`trl.chat_template_utils.<name>`), which TRL stores
            for response parsing but does not patch.
    """

    name: str
    models: str
    originals: tuple[str, ...] = ()
    trl_originals: tuple[str, ...] = ()

    @property
    def file(self) -> str:
        return f"{self.name}_training.jinja"

    def original_texts(self) -> list[str]:
        texts = [_read(name) for name in self.originals]
        if self.trl_originals:
            from trl import chat_template_utils

            texts += [getattr(chat_template_utils, name) for name in self.trl_originals]
        return texts


SHIPPED_TEMPLATES: dict[str, ShippedTemplate] = {
    template.name: template
    for template in (
        ShippedTemplate("smollm2", "SmolLM2-Instruct", originals=("smollm2.jinja",)),
        ShippedTemplate("smollm3", "SmolLM3-3B", originals=("smollm3.jinja",)),
        ShippedTemplate("llama3_1", "Llama-3.1-Instruct", trl_originals=("llama3_1_chat_template",)),
        ShippedTemplate("llama3_2", "Llama-3.2-Instruct", trl_originals=("llama3_2_chat_template",)),
        ShippedTemplate("mistral", "Mistral-7B-Instruct-v0.3", originals=("mistral.jinja",)),
        ShippedTemplate("chatml_tools", "ChatML models without tool calling"),
    )
}


def has_generation_markers(chat_template: str | None) -> bool:
    """Whether a template defines `{% generation %}` blocks (TRL's check, reused)."""
    from trl.chat_template_utils import has_generation_markers as trl_has_generation_markers

    return bool(chat_template) and trl_has_generation_markers(chat_template)


def template_path(name: str) -> Path:
    """The file of a shipped training template: `"smollm2"`, `"smollm2_training"` or `"smollm2_training.jinja"`.

    Raises:
        ValueError: no shipped template has that name.
    """
    key = str(name).removesuffix(".jinja").removesuffix("_training")
    if key not in SHIPPED_TEMPLATES:
        raise ValueError(
            f"No shipped chat template is called {name!r}; the shipped ones are {', '.join(SHIPPED_TEMPLATES)}."
        )
    return TEMPLATES_DIR / SHIPPED_TEMPLATES[key].file


def load_template(name: str) -> str:
    """The text of a shipped training template, by name (see `template_path`)."""
    return _read(template_path(name).name)


def _same_template(first: str, second: str) -> bool:
    # Jinja drops a single trailing newline, so a file saved with or without one renders the same
    return first == second or first.removesuffix("\n") == second.removesuffix("\n")


def find_shipped_template(chat_template: str | dict | None) -> ShippedTemplate | None:
    """The shipped training template whose original is exactly `chat_template` (TRL's identity rule), or None."""
    if isinstance(chat_template, dict):  # named variants: `default` is the one applied
        chat_template = chat_template.get("default")
    if not chat_template:
        return None
    for template in SHIPPED_TEMPLATES.values():
        if any(_same_template(chat_template, original) for original in template.original_texts()):
            return template
    return None


def missing_template_message(what: str = "The model's chat template") -> str:
    """The one-line error for a template that has no generation markers and no known training version."""
    names = ", ".join(SHIPPED_TEMPLATES)
    return (
        f"{what} has no `{{% generation %}}` markers, which `assistant_only_loss=True` needs, and neither TRL nor "
        f"hf-plugins knows a training version of it: pass `chat_template_path` (`--chat_template_path`) a .jinja "
        f"template that has them (a shipped one by name: {names}; files in {TEMPLATES_DIR}), or set "
        "`assistant_only_loss=False` to train on whole conversations."
    )


def training_chat_template(processing_class, chat_template: str | None = None) -> str | None:
    """The chat template to train with when assistant-only loss is on, following TRL's rules plus this package.

    Args:
        processing_class: The tokenizer or processor (TRL's checks render conversations with it).
        chat_template: The template to judge; defaults to the processing class's own.

    Returns:
        A shipped training template when `chat_template` is exactly one of its originals; None when no change is
        needed here: the template has generation markers already, or TRL patches it itself (TRL's known families).

    Raises:
        ValueError: one line saying what to do, when the template has no markers and nobody knows a training version.
    """
    if chat_template is None:
        chat_template = processing_class.chat_template
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    shipped = find_shipped_template(chat_template)
    if shipped is not None:
        return load_template(shipped.name)
    if not chat_template:
        raise ValueError(missing_template_message("The tokenizer has no chat template, so it"))
    if has_generation_markers(chat_template):
        return None
    from trl.chat_template_utils import get_training_chat_template

    # TRL reads the template off the processing class: let it judge `chat_template` without keeping it there
    saved = processing_class.chat_template
    processing_class.chat_template = chat_template
    try:
        get_training_chat_template(processing_class)
    except ValueError as error:
        raise ValueError(missing_template_message()) from error
    finally:
        processing_class.chat_template = saved
    return None
