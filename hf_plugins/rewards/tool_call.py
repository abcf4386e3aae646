"""TL-Training's rule-based tool-call reward (IRM, arXiv 2412.15495), as a reward function for TRL's `GRPOTrainer`.

A predicted call is compared with the gold call and the declared tools, and falls in exactly one category, checked in
this order (the official code's order and values):

| category | condition | reward |
|---|---|---|
| `format_error` | no call can be parsed from the completion | -2 |
| `tool_hallucination` | the predicted tool is not declared | -2 |
| `wrong_tool` | the predicted tool is declared but is not the gold one | -1.5 |
| `param_hallucinated_redundant_missing` | hallucinated, redundant and missing parameter names | -1.8 |
| `param_hallucinated_and_redundant_or_missing` | hallucinated, and redundant or missing (not both) | -1.3 |
| `param_redundant_and_missing` | redundant and missing, none hallucinated | -1.0 |
| `param_hallucinated` | hallucinated only | -0.8 |
| `param_redundant_or_missing` | redundant or missing (not both), none hallucinated | -0.5 |
| `wrong_value` | the parameter names match the gold ones, a value differs | -0.25 |
| `correct` | the same tool with the same arguments | 1 |

A predicted parameter name is *hallucinated* if the predicted tool does not declare it, *redundant* if the tool
declares it but the gold call does not use it; a gold parameter absent from the prediction is *missing*.

Two call formats are parsed: the paper's `name(key='value', ...)` (the first `name(...)`, up to the first `)`; only
single-quoted values, as the official code reads them) and the JSON objects chat templates emit
(`{"name": ..., "arguments": {...}}`, also inside `<tool_call>` tags, or `{"function": {...}}`). A completion with
several calls is judged on its first one. Parsing never raises: anything unparsable is a `format_error`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..data.tool_calls import declared_tools, message_text


#: Each category and its reward, in the order the categories are checked
TOOL_CALL_CATEGORIES: dict[str, float] = {
    "format_error": -2.0,
    "tool_hallucination": -2.0,
    "wrong_tool": -1.5,
    "param_hallucinated_redundant_missing": -1.8,
    "param_hallucinated_and_redundant_or_missing": -1.3,
    "param_redundant_and_missing": -1.0,
    "param_hallucinated": -0.8,
    "param_redundant_or_missing": -0.5,
    "wrong_value": -0.25,
    "correct": 1.0,
}

# `name(args)`: the name is an identifier (dots and dashes allowed, as in `api.search` or `get-weather`), the
# arguments run non-greedily up to the first `)`, as in the official parser
_PYTHON_CALL = re.compile(r"([A-Za-z_][\w.\-]*)\s*\((.*?)\)", re.DOTALL)
_SINGLE_QUOTED_ARG = re.compile(r"([A-Za-z_]\w*)\s*=\s*'([^']*)'")
# Lenient mode (strict=False) also reads double-quoted values and bare numbers / words
_LENIENT_ARG = re.compile(r"([A-Za-z_]\w*)\s*=\s*(?:'([^']*)'|\"([^\"]*)\"|([^,\s)]+))")
# Keyword arguments GRPOTrainer adds to the dataset columns
_NOT_COLUMNS = ("trainer_", "log_", "completion_ids", "environments")
_TOOL_CALL_TAG = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ParsedCall:
    """A tool call read from text: the tool's name and its arguments (name -> value)."""

    name: str
    arguments: dict[str, Any]


def _call_from_json(value: Any) -> ParsedCall | None:
    """A call from a decoded JSON value: `{"name", "arguments"|"parameters"}`, `{"function": {...}}`, or a list
    whose first element is one of those. Arguments may be an object or a JSON string of one."""
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, Mapping):
        return None
    if isinstance(value.get("function"), Mapping):
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        return None
    return ParsedCall(name.strip(), dict(arguments))


def _first_json_call(text: str) -> ParsedCall | None:
    """The first JSON object in `text` that reads as a call."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        call = _call_from_json(value)
        if call is not None:
            return call
    return None


def _python_call(text: str, strict: bool) -> ParsedCall | None:
    match = _PYTHON_CALL.search(text)
    if match is None:
        return None
    name, body = match.group(1), match.group(2)
    if strict:
        arguments = dict(_SINGLE_QUOTED_ARG.findall(body))
    else:
        arguments = {
            key: next((value for value in (single, double, bare) if value), "")
            for key, single, double, bare in _LENIENT_ARG.findall(body)
        }
    return ParsedCall(name, arguments)


def parse_tool_call(completion: Any, strict: bool = True) -> ParsedCall | None:
    """Read the first tool call of a completion, or None if there is none (never raises).

    `completion` is a string, a message dict (`{"role": "assistant", "content": ..., "tool_calls": [...]}`, as
    GRPOTrainer gives for conversational prompts, with `tool_calls` when the tokenizer parses them), a list of such
    messages, or a call already as a dict (`{"name", "arguments"}`). In text, a `<tool_call>` block is read as JSON
    (a malformed one is a format error); otherwise the first JSON call in the text, else the first `name(...)`.
    """
    try:
        if isinstance(completion, list):
            if completion and all(isinstance(item, Mapping) and "role" in item for item in completion):
                assistant = [item for item in completion if item.get("role") == "assistant"] or completion
                return parse_tool_call(assistant[0], strict)
            return _call_from_json(completion)
        if isinstance(completion, Mapping):
            if "role" in completion:
                calls = completion.get("tool_calls") or []
                if calls:
                    return _call_from_json(calls[0])
                completion = completion.get("content")
                if not isinstance(completion, str):
                    completion = message_text(completion)
            else:
                return _call_from_json(completion)
        if not isinstance(completion, str) or not completion.strip():
            return None
        tagged = _TOOL_CALL_TAG.search(completion)
        if tagged is not None:
            return _first_json_call(tagged.group(1))
        return _first_json_call(completion) or _python_call(completion, strict)
    except Exception:  # noqa: BLE001 - any failure to read a completion is a format error, by definition
        return None


def _same_value(predicted: Any, gold: Any, strict: bool) -> bool:
    if strict:
        return predicted == gold and type(predicted) is type(gold)
    return _normalized(predicted) == _normalized(gold)


def _normalized(value: Any) -> str:
    if isinstance(value, str):
        text = value.strip()
        try:
            decoded = json.loads(text)
        except (json.JSONDecodeError, ValueError):
            return text.lower()
        if isinstance(decoded, (dict, list)):
            return json.dumps(decoded, sort_keys=True)
        return str(decoded).lower() if not isinstance(decoded, str) else decoded.strip().lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value).lower()


def _gold_call(gold_call: Any) -> ParsedCall:
    if isinstance(gold_call, ParsedCall):
        return gold_call
    if isinstance(gold_call, str):
        try:
            gold_call_value = json.loads(gold_call)
        except json.JSONDecodeError:
            gold_call_value = None
        call = _call_from_json(gold_call_value) if gold_call_value is not None else None
        call = call or parse_tool_call(gold_call, strict=False)
    else:
        call = parse_tool_call(gold_call, strict=False)
    if call is None or not call.name:
        raise ValueError(
            f"The gold call {gold_call!r} cannot be parsed: give it as `name(key='value', ...)`, as a JSON object "
            '`{"name": ..., "arguments": {...}}`, or as such a dict.'
        )
    return call


def classify_tool_call(completion: Any, gold_call: Any, tools: Any, *, strict: bool = True) -> str:
    """The category of a predicted tool call (a key of `TOOL_CALL_CATEGORIES`), as TL-Training's reward defines it.

    Args:
        completion: the model's output: a string, an assistant message (dict or list of dicts, with `content` and
            optionally parsed `tool_calls`), or a call dict.
        gold_call: the correct call: `name(key='value')` text, a JSON string or a dict `{"name", "arguments"}`.
        tools: the declared tools (JSON schemas in transformers' `tools` format, or a JSON string of them); the
            parameter names of each tool are read from `parameters.properties`.
        strict (`bool`, defaults to `True`): the official rules: `name(...)` arguments count only with single-quoted
            values, and values must be equal with the same type. `False` also reads double-quoted and bare values
            and compares values after normalisation (case, surrounding spaces, `"3"` == `3`).

    Never raises for a bad completion (that is a `format_error`); raises a `ValueError` for an unparsable gold call
    or a malformed `tools`.
    """
    gold = _gold_call(gold_call)
    declared = declared_tools(tools)
    predicted = parse_tool_call(completion, strict=strict)
    if predicted is None or not predicted.name:
        return "format_error"
    if predicted.name not in declared:
        return "tool_hallucination"
    if predicted.name != gold.name:
        return "wrong_tool"
    valid = declared[predicted.name]
    hallucinated = any(key not in valid for key in predicted.arguments)
    redundant = any(key in valid and key not in gold.arguments for key in predicted.arguments)
    missing = any(key not in predicted.arguments for key in gold.arguments)
    if hallucinated and redundant and missing:
        return "param_hallucinated_redundant_missing"
    if hallucinated and (redundant or missing):
        return "param_hallucinated_and_redundant_or_missing"
    if redundant and missing:
        return "param_redundant_and_missing"
    if hallucinated:
        return "param_hallucinated"
    if redundant or missing:
        return "param_redundant_or_missing"
    if any(not _same_value(predicted.arguments[key], value, strict) for key, value in gold.arguments.items()):
        return "wrong_value"
    return "correct"


def make_tool_call_reward(
    gold_column: str = "gold_call", tools_column: str = "tools", *, strict: bool = True, log_prefix: str = "tool_call"
) -> Callable[..., list[float]]:
    """A `tool_call_reward` reading other dataset columns, or with the lenient parsing (`strict=False`, see
    `classify_tool_call`). The returned function is named `tool_call_reward` (GRPOTrainer logs rewards by name)."""

    def tool_call_reward(prompts=None, completions=None, log_metric=None, **kwargs) -> list[float]:
        for column in (gold_column, tools_column):
            if column not in kwargs:
                raise ValueError(
                    f"tool_call_reward needs the dataset column `{column}` (the gold call and the declared tools of "
                    f"each prompt); the batch has {sorted(k for k in kwargs if not k.startswith(_NOT_COLUMNS))}."
                )
        golds, tools = kwargs[gold_column], kwargs[tools_column]
        if len(golds) != len(completions) or len(tools) != len(completions):
            raise ValueError(
                f"tool_call_reward got {len(completions)} completions but {len(golds)} `{gold_column}` and "
                f"{len(tools)} `{tools_column}` values: pass one of each per completion."
            )
        categories = [
            classify_tool_call(completion, gold, tool_list, strict=strict)
            for completion, gold, tool_list in zip(completions, golds, tools)
        ]
        if log_metric is not None:
            # GRPOTrainer averages each metric over the logging interval and across processes: the logged value is
            # the mean number of completions per reward call that fell in the category
            for category in TOOL_CALL_CATEGORIES:
                log_metric(f"{log_prefix}/{category}", float(categories.count(category)))
        return [TOOL_CALL_CATEGORIES[category] for category in categories]

    return tool_call_reward


#: TL-Training's reward for `trl.GRPOTrainer(reward_funcs=[tool_call_reward])`: reads the dataset columns `gold_call`
#: and `tools`, official (strict) parsing, and logs the count of each category as `tool_call/<category>`.
tool_call_reward = make_tool_call_reward()
