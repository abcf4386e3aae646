"""Tool-calling conversations for TL-Training (Ye et al., arXiv 2412.15495): which assistant turns are trained (MAE)
and how much each of their tokens weighs (PKT), computed once per example during dataset preparation.

The data is the `messages` + `tools` format of TRL and transformers chat templates: assistant messages carry
`tool_calls` (`[{"type": "function", "function": {"name": ..., "arguments": ...}}]`), tool responses are messages of
role `tool`, and `tools` holds the JSON schemas of the tools a conversation may call (a list, or that list serialised
as a JSON string).

- **MAE** (mitigating adverse effects): an assistant turn is a training target only if it is the last message, or if
  it is followed by tool responses none of which contains an error pattern. Erroneous calls stay in the context of the
  later turns, so the corrected call after them *is* trained. Patterns are matched as the official code matches them:
  both strings lowercased with every non-alphanumeric character removed.
- **PKT** (prioritising key tokens): in each trained turn that calls tools, the *key tokens* are the first token of
  each called tool's name and, for each other declared tool whose name shares a token prefix with it, the token where
  the two names first diverge. Key tokens weigh `clip(n_other / n_key, 1, max_weight)`, where `n_key` is the number
  of key tokens of the turn and `n_other` the number of its other tokens; every other token of a trained turn weighs 1.

`tokenize_tool_conversation` renders one example with the chat template and returns `input_ids`, `labels` (-100
outside trained turns) and `token_weights` (0 outside trained turns), which `TLTrainer` feeds to the fused
`"weighted"` loss head.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..ops.method import IGNORE_INDEX


#: Error patterns of the official MAE code: a tool response containing any of them (after normalisation, see
#: `normalize_for_matching`) marks the call before it as erroneous. Note that `'error'` and `"error":` both normalise
#: to `error`, so any response containing the letters "error" (also "errors", "terror") counts as an error.
DEFAULT_ERROR_PATTERNS: tuple[str, ...] = (
    "is not defined",
    "positional argument",
    "unexpected keyword",
    "'related_searches'",
    "ConnectionError",
    '"error":',
    "not supported",
    "Invalid API call",
    "Response error",
    "Object of type SerpResults is not JSON serializable",
    "400 Client Error",
    "'error'",
    "slice indices must be integers or None or have an __index__ method",
    "connection error",
)


# ----------------------------------------------------------------------------------------------------------- MAE


def normalize_for_matching(text: str) -> str:
    """Lowercase `text` and drop every character that is not a letter or a digit (in any script, CJK included), as
    the official MAE code does before matching error patterns."""
    return "".join(char for char in text if char.isalnum()).lower()


def check_error_patterns(error_patterns: Iterable[str] | None) -> tuple[str, ...]:
    """The patterns as a tuple (`None`: the official ones), raising a `ValueError` for a pattern that is not a string
    or that normalises to nothing (it would match every response)."""
    if error_patterns is None:
        return DEFAULT_ERROR_PATTERNS
    if isinstance(error_patterns, str):
        raise ValueError(
            f"`error_patterns` must be a list of strings, got the single string {error_patterns!r}: wrap it in a list."
        )
    patterns = tuple(error_patterns)
    for pattern in patterns:
        if not isinstance(pattern, str) or not normalize_for_matching(pattern):
            raise ValueError(
                f"`error_patterns` holds {pattern!r}, which has no letter or digit: patterns are matched after "
                "removing every other character, so it would match every tool response. Remove it."
            )
    return patterns


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string, None (no text), a list of `{"type": "text", "text": ...}` parts,
    or any other JSON value (serialised)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, Mapping) for part in content):
        return "".join(str(part.get("text") or "") for part in content if part.get("type", "text") == "text")
    return json.dumps(content, ensure_ascii=False, default=str)


def is_error_response(content: Any, error_patterns: Iterable[str] | None = None) -> bool:
    """Whether a tool response contains one of `error_patterns` (default: the official ones), both sides normalised
    with `normalize_for_matching`."""
    text = normalize_for_matching(message_text(content))
    return any(normalize_for_matching(pattern) in text for pattern in check_error_patterns(error_patterns))


def mae_trained_turns(
    messages: Sequence[Mapping[str, Any]], error_patterns: Iterable[str] | None = None
) -> list[bool]:
    """For each message, whether MAE keeps it as a training target.

    An assistant message is kept if it is the last message, or if the messages right after it are tool responses
    (one or more) and none of them contains an error pattern. An assistant turn followed by a user message, by another
    assistant message or by an erroneous tool response is not kept. Other roles are never targets.
    """
    patterns = check_error_patterns(error_patterns)
    kept = [False] * len(messages)
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == len(messages) - 1:
            kept[index] = True
            continue
        responses = []
        for later in messages[index + 1 :]:
            if later.get("role") != "tool":
                break
            responses.append(later.get("content"))
        kept[index] = bool(responses) and not any(is_error_response(response, patterns) for response in responses)
    return kept


# ----------------------------------------------------------------------------------------------- tools and calls


def parse_tools(tools: Any) -> list[dict[str, Any]]:
    """The `tools` of an example as a list of schemas: a JSON string is decoded, None gives `[]`."""
    if tools is None:
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"`tools` is a string but not valid JSON ({error}): pass a list of tool schemas."
            ) from None
    if isinstance(tools, Mapping):
        tools = [tools]
    if not isinstance(tools, list):
        raise ValueError(
            f"`tools` must be a list of JSON schemas (or a JSON string of one), got {type(tools).__name__}."
        )
    return tools


def _function_of(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    """`{"type": "function", "function": {...}}` -> the inner dict; a bare `{"name": ...}` as it is."""
    inner = entry.get("function") if isinstance(entry, Mapping) else None
    return inner if isinstance(inner, Mapping) else entry


def declared_tools(tools: Any) -> dict[str, set[str]]:
    """Map each declared tool name to its parameter names, from JSON schemas in transformers' `tools` format
    (`{"type": "function", "function": {"name", "parameters": {"properties": {...}}}}` or the inner dict alone).
    Properties set to None (Arrow fills the keys a row lacks with None) are ignored."""
    declared: dict[str, set[str]] = {}
    for entry in parse_tools(tools):
        function = _function_of(entry) if isinstance(entry, Mapping) else None
        name = function.get("name") if function is not None else None
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"A tool schema has no `name`: {entry!r}. Each entry of `tools` must be a JSON schema such as "
                '{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}.'
            )
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        declared[name] = {key for key, value in (properties or {}).items() if value is not None}
    return declared


def tool_call_names(message: Mapping[str, Any]) -> list[str]:
    """Names of the tools an assistant message calls, in order (`[]` without `tool_calls`)."""
    names = []
    for call in message.get("tool_calls") or []:
        function = _function_of(call) if isinstance(call, Mapping) else None
        name = function.get("name") if function is not None else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"A tool call has no function name: {call!r}.")
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------- PKT


def _name_tokens(tokenizer, name: str, left: str, right: str):
    """Tokenize `left + name + right`; return the (id, start, end) of the tokens overlapping `name` (offsets relative
    to the start of `name`) and the start of the first token after it (or None)."""
    encoding = tokenizer(left + name + right, add_special_tokens=False, return_offsets_mapping=True)
    low, high = len(left), len(left) + len(name)
    tokens, after = [], None
    for token_id, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        if end > low and start < high:
            tokens.append((token_id, start - low, end - low))
        elif start >= high and end > start and after is None:
            after = start - low
    return tokens, after


def common_token_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def key_token_indices(tokenizer, name: str, other_names: Iterable[str], left: str = "", right: str = "") -> list[int]:
    """PKT's key tokens of a call of `name`, as indices into the tokens of `name`.

    The tokens of `name` are those of `left + name + right` that overlap `name` (give the text around the name in
    the rendered call, so that it is tokenized as in context); every other name is tokenized with the same `left` and
    `right`. Index 0 (the first token) is always key; for each other name sharing a token prefix of length `L > 0`,
    index `L` is key (the first token where the two diverge). `L` equals the number of name tokens when `name` is a
    token prefix of the other name: the key token is then the token after the name, which decides where it ends.

    Example: `getPapersByKeywords` against `getPaperDetails` gives two key indices (the first token, and the token
    after the shared `getPaper` tokens); against `finish` only `[0]`.
    """
    gold, _ = _name_tokens(tokenizer, name, left, right)
    gold_ids = [token_id for token_id, _, _ in gold]
    keys = {0}
    for other in set(other_names) - {name}:
        other_ids = [token_id for token_id, _, _ in _name_tokens(tokenizer, other, left, right)[0]]
        shared = common_token_prefix(gold_ids, other_ids)
        if shared > 0:
            keys.add(shared)
    return sorted(keys)


def _key_char_offsets(tokenizer, name: str, other_names: Iterable[str], left: str, right: str) -> list[int]:
    """Character offsets (relative to the start of `name`) of the key tokens found by `key_token_indices`."""
    gold, after = _name_tokens(tokenizer, name, left, right)
    offsets = []
    for index in key_token_indices(tokenizer, name, other_names, left, right):
        if index < len(gold):
            offsets.append(max(gold[index][1], 0))
        else:
            offsets.append(after if after is not None else len(name))
    return offsets


def pkt_weight(num_tokens: int, num_key: int, max_weight: float) -> float:
    """Weight of each key token of a turn of `num_tokens` tokens with `num_key` key tokens:
    `clip((num_tokens - num_key) / num_key, 1, max_weight)`."""
    if num_key <= 0:
        return 1.0
    return float(min(max((num_tokens - num_key) / num_key, 1.0), max_weight))


def check_max_weight(max_weight: Any) -> float:
    """`max_weight` as a float, raising a `ValueError` unless it is a finite number >= 1."""
    if isinstance(max_weight, bool) or not isinstance(max_weight, (int, float)) or not math.isfinite(max_weight):
        raise ValueError(f"`max_weight` must be a finite number >= 1, got {max_weight!r}.")
    if max_weight < 1:
        raise ValueError(
            f"`max_weight={max_weight}` is below 1: key tokens would weigh less than the other tokens, the opposite "
            "of PKT. Use a value >= 1 (the paper's is 9), or `pkt=False` to train without key-token weights."
        )
    return float(max_weight)


def _is_name_char(char: str) -> bool:
    return char.isalnum() or char in "_-."


def _find_name(text: str, name: str, start: int, end: int) -> int:
    """First occurrence of `name` in `text[start:end]` not glued to other name characters, or -1."""
    position = text.find(name, start, end)
    while position != -1:
        before = text[position - 1] if position > 0 else " "
        after_index = position + len(name)
        after = text[after_index] if after_index < len(text) else " "
        if not _is_name_char(before) and not _is_name_char(after):
            return position
        position = text.find(name, position + 1, end)
    return -1


def _context(text: str, start: int, end: int, width: int = 16) -> tuple[str, str]:
    """The text around `text[start:end]` up to the nearest whitespace (at most `width` characters each side; the
    whitespace before is included, since many tokenizers glue a leading space to the next word)."""
    left_start = start
    while left_start > 0 and start - left_start < width and not text[left_start - 1].isspace():
        left_start -= 1
    if left_start > 0 and start - left_start < width:
        left_start -= 1  # the whitespace itself
    right_end = end
    while right_end < len(text) and right_end - end < width and not text[right_end].isspace():
        right_end += 1
    return text[left_start:start], text[end:right_end]


# ---------------------------------------------------------------------------------------------- one example


def _assistant_blocks(mask: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of 1 in an assistant-token mask, as `(start, end)` token ranges."""
    blocks, start = [], None
    for index, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = index
        elif not bit and start is not None:
            blocks.append((start, index))
            start = None
    return blocks


def example_messages(example: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], int]:
    """The conversation of a dataset row and the index of its first message that may be trained: `messages` (all),
    or conversational `prompt` + `completion` (only the completion)."""
    if "messages" in example and example["messages"] is not None:
        return list(example["messages"]), 0
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return [*prompt, *completion], len(prompt)
    raise ValueError(
        "TL-Training needs conversational rows: a `messages` column (or conversational `prompt` and `completion` "
        f"columns) with assistant `tool_calls` and `tool` responses; this row has the columns {sorted(example)}."
    )


def _check_calls_declared(messages: Sequence[Mapping[str, Any]], declared: Mapping[str, Any]) -> None:
    """Raise a `ValueError` unless every tool an assistant message calls is among the `declared` tools."""
    for message in messages:
        names = tool_call_names(message) if message.get("role") == "assistant" else []
        if names and not declared:
            raise ValueError(
                f"A conversation calls {names[0]!r} but declares no tools: TL-Training needs the `tools` column (the "
                "JSON schema of every tool the conversation may call). The chat template shows them to the model, "
                "and key-token weighting compares the called name with the other declared names."
            )
        for name in names:
            if name not in declared:
                raise ValueError(
                    f"A conversation calls the tool {name!r}, which its `tools` do not declare (declared: "
                    f"{', '.join(sorted(declared))}). Add its schema to `tools`, or fix the call."
                )


def _trained_turns(
    messages: Sequence[Mapping[str, Any]], first_trainable: int, mae: bool, error_patterns: Iterable[str] | None
) -> list[bool]:
    """For each message, whether it is trained: the assistant turns MAE keeps (every assistant turn without `mae`),
    from message `first_trainable` on."""
    if mae:
        trained = mae_trained_turns(messages, error_patterns)
    else:
        trained = [message.get("role") == "assistant" for message in messages]
    return [keep and index >= first_trainable for index, keep in enumerate(trained)]


@dataclass(frozen=True)
class _RenderedConversation:
    """A conversation rendered by the chat template: its tokens, which of them are assistant tokens, the text and,
    per token, its character span in the text (`offsets`) and where that span starts (`starts`)."""

    input_ids: list[int]
    assistant_mask: list[int]
    text: str
    offsets: list[tuple[int, int]]
    starts: list[int]


def _render_conversation(
    messages: Sequence[Mapping[str, Any]], tokenizer, template_kwargs: Mapping[str, Any]
) -> _RenderedConversation:
    """Render `messages` with the chat template, as tokens with the assistant-token mask and as text with the
    character offsets of those tokens (a `ValueError` if the text does not tokenize to the same tokens)."""
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **template_kwargs
    )
    input_ids, assistant_mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoding["input_ids"]) != input_ids:
        raise ValueError(
            "The chat template's rendering tokenizes differently on its own than through `apply_chat_template`, so "
            "tool names cannot be located in the tokens. Use a template whose text tokenizes the same either way."
        )
    offsets = [tuple(pair) for pair in encoding["offset_mapping"]]
    return _RenderedConversation(input_ids, assistant_mask, text, offsets, [start for start, _ in offsets])


def _assistant_turn_blocks(
    assistant_mask: Sequence[int], messages: Sequence[Mapping[str, Any]]
) -> list[tuple[tuple[int, int], int]]:
    """Pair each assistant message with its token range: `[((start, end), message_index), ...]`, raising a
    `ValueError` when the template marks no assistant tokens, or not one span per assistant message."""
    assistant_indices = [index for index, message in enumerate(messages) if message.get("role") == "assistant"]
    blocks = _assistant_blocks(assistant_mask)
    if not blocks and assistant_indices:
        raise ValueError(
            "The chat template marks no assistant tokens: TL-Training needs `{% generation %}` / "
            "`{% endgeneration %}` markers around each assistant turn (keep `assistant_only_loss=True`, which swaps "
            "in a training template with them for the models TRL or hf-plugins knows, or pass one: "
            "`chat_template_path` of the trainer, such as the shipped `chatml_tools`, or `chat_template` here)."
        )
    if len(blocks) != len(assistant_indices):
        raise ValueError(
            f"The chat template marks {len(blocks)} separate assistant spans for {len(assistant_indices)} assistant "
            "messages: TL-Training needs one `{% generation %}` span per assistant message, with other text between."
        )
    return list(zip(blocks, assistant_indices))


def _turn_key_tokens(
    tokenizer,
    rendering: _RenderedConversation,
    block: tuple[int, int],
    message: Mapping[str, Any],
    names: Sequence[str],
    declared: Iterable[str],
) -> set[int]:
    """PKT's key tokens of one trained assistant turn, as token positions inside its `block`: each called name is
    found in the rendered text after the turn's content and the names before it, and its key tokens
    (`key_token_indices` against the other `declared` names) are mapped back to token positions."""
    text, starts = rendering.text, rendering.starts
    block_start, block_end = block
    char_start, char_end = rendering.offsets[block_start][0], rendering.offsets[block_end - 1][1]
    cursor = char_start
    content = message_text(message.get("content"))
    if content:
        found = text.find(content, cursor, char_end)
        cursor = found + len(content) if found != -1 else cursor
    keys = set()
    for name in names:
        position = _find_name(text, name, cursor, char_end)
        if position == -1:
            raise ValueError(
                f"The chat template does not render the name of the tool call {name!r} inside the assistant turn: "
                "key tokens cannot be located. Use a template that writes each call's function name."
            )
        cursor = position + len(name)
        left, right = _context(text, position, cursor)
        others = [other for other in declared if other != name]
        for relative in _key_char_offsets(tokenizer, name, others, left, right):
            token = bisect.bisect_right(starts, position + relative) - 1
            if block_start <= token < block_end:
                keys.add(token)
    return keys


def tokenize_tool_conversation(
    example: Mapping[str, Any],
    tokenizer,
    *,
    chat_template: str | None = None,
    max_weight: float = 9.0,
    pkt: bool = True,
    mae: bool = True,
    error_patterns: Iterable[str] | None = None,
) -> dict[str, list]:
    """Render one conversation with the chat template and compute TL-Training's labels and token weights.

    Args:
        example (`Mapping`): a dataset row with `messages` (or conversational `prompt` + `completion`, of which only
            the completion is trained), `tools` (JSON schemas, or a JSON string of them) and optionally
            `chat_template_kwargs`.
        tokenizer: a fast tokenizer whose chat template (or `chat_template`) marks assistant turns with
            `{% generation %}` / `{% endgeneration %}`.
        chat_template (`str`, *optional*): a template to use instead of the tokenizer's.
        max_weight (`float`): the upper clip of the key-token weight (the paper's 9).
        pkt (`bool`): weigh key tokens (else every trained token weighs 1).
        mae (`bool`): train only the assistant turns MAE keeps (else every assistant turn).
        error_patterns (`list[str]`, *optional*): MAE's patterns (default: the official ones).

    Returns:
        `dict` with `input_ids`, `labels` (the token ids on trained turns, -100 elsewhere) and `token_weights` (1 on
        trained tokens, the PKT weight on key tokens, 0 outside trained turns).
    """
    max_weight = check_max_weight(max_weight)
    messages, first_trainable = example_messages(example)
    tools = parse_tools(example.get("tools"))
    declared = declared_tools(tools)
    _check_calls_declared(messages, declared)
    trained = _trained_turns(messages, first_trainable, mae, error_patterns)
    template_kwargs = dict(example.get("chat_template_kwargs") or {})
    template_kwargs.update(tools=tools or None, chat_template=chat_template)
    rendering = _render_conversation(messages, tokenizer, template_kwargs)
    input_ids = rendering.input_ids

    labels = [IGNORE_INDEX] * len(input_ids)
    weights = [0.0] * len(input_ids)
    for (block_start, block_end), index in _assistant_turn_blocks(rendering.assistant_mask, messages):
        if not trained[index]:
            continue
        for position in range(block_start, block_end):
            labels[position] = input_ids[position]
            weights[position] = 1.0
        names = tool_call_names(messages[index])
        if not (pkt and names):
            continue
        keys = _turn_key_tokens(tokenizer, rendering, (block_start, block_end), messages[index], names, declared)
        weight = pkt_weight(block_end - block_start, len(keys), max_weight)
        for token in keys:
            weights[token] = weight
    return {"input_ids": input_ids, "labels": labels, "token_weights": weights}


def truncate_columns(example: Mapping[str, Any], columns: Sequence[str], max_length: int, mode: str) -> dict:
    """Truncate per-token columns together to `max_length`, keeping the start (`"keep_start"`) or the end
    (`"keep_end"`), as TRL truncates `input_ids` and `labels`."""
    if mode == "keep_start":
        cut = slice(None, max_length)
    elif mode == "keep_end":
        cut = slice(-max_length, None)
    else:
        raise ValueError(f"Unsupported `truncation_mode={mode!r}`: use 'keep_start' or 'keep_end'.")
    return {column: list(example[column])[cut] for column in columns}
