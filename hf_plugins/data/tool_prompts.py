"""Prompts for reinforcement learning on tool calls (TL-Training's reward with `GRPOTrainer`): each row's conversation
up to its first assistant turn, rendered as text with that row's own `tools`.

`GRPOTrainer` renders conversational prompts itself, but with the trainer's `tools` argument, one list for the whole
dataset, which it also executes. When every row declares its own tools (the `messages` + `tools` format), the prompt
must be rendered beforehand, and by a template that writes the tools into it: SmolLM2's original template, for one,
ignores `tools`, and the model is then asked to call tools it has never been shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..chat_templates import find_shipped_template, load_template
from .tool_calls import parse_tools


def _prompt_messages(example: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A conversational `prompt`, or `messages` up to the first assistant turn; keys whose value is None (Arrow fills
    the keys a message lacks with None) are dropped."""
    if isinstance(example.get("prompt"), list):
        messages = list(example["prompt"])
    elif isinstance(example.get("messages"), list):
        messages = list(example["messages"])
        first_assistant = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
        messages = messages[:first_assistant]
    else:
        raise ValueError(
            "Rendering a tool-call prompt needs a `messages` column (the conversation, cut before its first assistant "
            f"turn) or a conversational `prompt` column; this row has the columns {sorted(example)}."
        )
    if not messages:
        raise ValueError("The row's prompt is empty: its conversation starts with an assistant turn.")
    return [{key: value for key, value in message.items() if value is not None} for message in messages]


def render_tool_prompt(example: Mapping[str, Any], tokenizer, *, chat_template: str | None = None) -> dict[str, str]:
    """Render a row's prompt as text, with the row's own `tools`, ready for `GRPOTrainer` (a `datasets.map` function).

    The prompt is the row's conversational `prompt`, or its `messages` up to the first assistant turn, followed by the
    generation prompt. The other columns (`tools`, `gold_call`, ...) stay, so a reward function such as
    `hf_plugins.tool_call_reward` receives them.

    A template that writes nothing for the tools would silently give the model a prompt without them. When the
    template (the tokenizer's, or `chat_template`) is exactly an original that `hf_plugins.chat_templates` knows, its
    shipped training version is used instead: it renders everything else identically and writes the tools (SmolLM2's
    in the format of SmolLM2's function-calling prompt). Any other template that drops the tools is an error.

    Args:
        example: A dataset row: `messages` or a conversational `prompt`, and `tools` (JSON schemas, a list or a JSON
            string of one; None or empty for no tools).
        tokenizer: The tokenizer of the model to train.
        chat_template: A template to use instead of the tokenizer's.

    Returns:
        `{"prompt": text}`.

    Example:
        ```python
        dataset = dataset.map(render_tool_prompt, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"])
        trainer = GRPOTrainer(model=..., reward_funcs=[tool_call_reward], train_dataset=dataset, ...)
        ```

    Raises:
        ValueError: the row has no conversation, or the template drops the row's tools.
    """
    messages = _prompt_messages(example)
    tools = parse_tools(example.get("tools")) or None
    template = chat_template or tokenizer.chat_template

    def render(template: str, tools) -> str:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, add_generation_prompt=True, tokenize=False
        )

    prompt = render(template, tools)
    if tools and prompt == render(template, None):
        shipped = find_shipped_template(template)
        if shipped is not None:
            template = load_template(shipped.name)
            prompt = render(template, tools)
        if shipped is None or prompt == render(template, None):
            raise ValueError(
                "The chat template writes nothing for the row's `tools`, so the model would be asked to call tools "
                "it is never shown: pass `chat_template` a template that renders them (e.g. "
                "`hf_plugins.chat_templates.load_template('chatml_tools')` for a ChatML model)."
            )
    return {"prompt": prompt}
