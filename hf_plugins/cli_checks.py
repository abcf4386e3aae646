"""Checks of `hf-plugins <method>` input that run before any model is loaded.

A bad argument should cost the user one line and a second, not a traceback after the model has loaded and the data
has been tokenised. Everything that can be decided from the arguments and the raw dataset rows is checked here:
field names (with the closest known name), the model path (a folder with a config, or a Hub id that the offline
cache holds), the checkpoint to resume from, the dataset's columns against the format the method reads, and
assistant turns in conversations. Each failure is a `UsageError`, printed by the command as one line with exit
status 2.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path


#: Rows read from a streaming dataset to check it (a `Dataset` is checked whole).
STREAMING_ROWS_CHECKED = 1000


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ field names


def unknown_field_message(
    name: str, known: list[str], other_commands: dict[str, list[str]], command: str, on_command_line: bool
) -> str:
    """What to say about a field `name` that `hf-plugins <command>` does not have: the command whose config has it,
    or the closest known name. Names are shown as flags (`--name`) or as YAML keys."""

    def shown(field):
        return f"`--{field}`" if on_command_line else f"`{field}` (a key of the YAML config)"

    owners = [other for other, fields in other_commands.items() if name in fields]
    if owners:
        listed = ", ".join(f"`hf-plugins {other}`" for other in owners)
        return f"{shown(name)} is a field of {listed}, not of `hf-plugins {command}`"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    if close:
        mean = f"--{close[0]}" if on_command_line else close[0]
        return f"{shown(name)} is not a field of `hf-plugins {command}`: did you mean `{mean}`?"
    return f"{shown(name)} is not a field of `hf-plugins {command}` (`hf-plugins {command} --help` lists them)"


# ------------------------------------------------------------------------------------------------ paths


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return constants.is_offline_mode() or flag


def check_model_path(
    name: str,
    flag: str = "--model_name_or_path",
    revision: str | None = None,
    cache_dir=None,
    gguf_file: str | None = None,
):
    """`name` is a local model folder (with a config, an adapter config or the `gguf_file`), or a Hub repo id (one
    that the local cache holds when the Hub is offline)."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = ("config.json", "adapter_config.json", *([gguf_file] if gguf_file else []))
        if not any((path / file).is_file() for file in files):
            raise UsageError(
                f"{flag} {name}: the folder holds no config.json, so it is not a saved model (save one with "
                "`save_pretrained`, or pass a Hub id)"
            )
        return
    if path.exists():
        raise UsageError(f"{flag} {name} is a file: pass the folder of a saved model (with config.json) or a Hub id")
    from huggingface_hub import try_to_load_from_cache

    from .trainers.model_card import is_hub_repo_id

    if not is_hub_repo_id(name):
        raise UsageError(f"{flag} {name}: no such folder (pass a local model folder or a Hub id such as org/model)")
    if _offline():
        for file in ("config.json", "adapter_config.json"):
            if isinstance(try_to_load_from_cache(name, file, cache_dir=cache_dir, revision=revision), str):
                return
        raise UsageError(
            f"{flag} {name}: no such local folder, and the Hub is offline (HF_HUB_OFFLINE) with no copy of {name} in "
            f"the local Hub cache: pass a local folder, or download the model first (`hf download {name}`)"
        )


def check_checkpoint(path: str) -> None:
    """`--resume_from_checkpoint` names a folder written by the Trainer (it holds `trainer_state.json`)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"--resume_from_checkpoint {path}: the folder does not exist")
    if not folder.is_dir():
        raise UsageError(f"--resume_from_checkpoint {path} is a file: pass a checkpoint folder (checkpoint-<step>)")
    if (folder / "trainer_state.json").is_file():
        return
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(folder))
    hint = f"; did you mean its latest checkpoint {last}?" if last else " (a checkpoint-<step> folder of output_dir)"
    raise UsageError(f"--resume_from_checkpoint {path} is not a checkpoint: it holds no trainer_state.json{hint}")


# ------------------------------------------------------------------------------------------------ datasets


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # a streaming dataset whose features are unknown until read
        names = list(next(iter(dataset)).keys())
    return list(names)


def _first_value(dataset, column):
    for row in _rows(dataset, [column], limit=STREAMING_ROWS_CHECKED):
        if row[column] is not None:
            return row[column]
    return None


def _rows(dataset, columns, limit=None):
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        dataset = dataset.select_columns(columns)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        for index in range(count):
            yield dataset[index]
        return
    for index, row in enumerate(dataset):
        if limit is not None and index >= limit:
            return
        yield {column: row.get(column) for column in columns}


def _is_conversation(value) -> bool:
    """A list of messages with a `role` (TRL's conversational format)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _is_sharegpt(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "from" in m for m in value)


def _format_hint(dataset, columns: list[str], text_field: str, conversations_only: bool) -> str:
    """Which column could serve, and how to make it do so."""
    for column in columns:
        value = _first_value(dataset, column)
        if _is_conversation(value):
            return (
                f"column `{column}` holds conversations: rename it to `messages` "
                f"(`dataset.rename_column('{column}', 'messages')`)"
            )
        if _is_sharegpt(value):
            return (
                f"column `{column}` holds ShareGPT-style turns (`from`/`value`): convert them to `messages` of "
                "{'role': ..., 'content': ...} dicts"
            )
    if "prompt" in columns and "completion" not in columns:
        return "it has `prompt` but no `completion` column"
    if conversations_only:
        return "each row is one conversation: a list of {'role': ..., 'content': ...} messages"
    strings = [column for column in columns if isinstance(_first_value(dataset, column), str)]
    if strings:
        return f"to train on the text of column `{strings[0]}`, pass --dataset_text_field {strings[0]}"
    return f"the text column is set by --dataset_text_field (now {text_field!r})"


def dataset_format(dataset, text_field: str = "text") -> str | None:
    """`"tokenized"`, `"conversational"` (`messages`), `"prompt-completion"`, `"text"`, or None (none of TRL's)."""
    columns = _column_names(dataset)
    if "input_ids" in columns:
        return "tokenized"
    if "messages" in columns:
        return "conversational" if _is_conversation(_first_value(dataset, "messages")) else None
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if text_field in columns:
        return "text"
    return None


def check_dataset_format(
    dataset,
    command: str,
    split: str,
    text_field: str,
    conversations_only: bool = False,
    required_columns: dict[str, str] | None = None,
    tokenized_columns: tuple[str, ...] = (),
) -> str:
    """The dataset's format (see `dataset_format`), or a `UsageError` naming its columns and the fix.

    `conversations_only`: the method reads conversations only; `required_columns`: columns it needs in any format,
    each with how to add it; `tokenized_columns`: the columns an already tokenized dataset needs."""
    columns = _column_names(dataset)
    found = dataset_format(dataset, text_field)
    listed = ", ".join(f"`{c}`" for c in columns) or "none"
    conversational = found == "conversational" or (
        found == "prompt-completion" and _is_conversation(_first_value(dataset, "completion"))
    )
    if found is None or (conversations_only and found != "tokenized" and not conversational):
        if conversations_only:
            needs = "a `messages` column of conversations (or conversational `prompt` and `completion` columns)"
        else:
            needs = (
                f"a `messages` column (conversations), `prompt` and `completion` columns, or a `{text_field}` column "
                "(--dataset_text_field)"
            )
        if "messages" in columns and not _is_conversation(_first_value(dataset, "messages")):
            hint = "its `messages` are not lists of {'role': ..., 'content': ...} dicts"
        else:
            hint = _format_hint(dataset, [c for c in columns if c != "messages"], text_field, conversations_only)
        raise UsageError(f"the {split} dataset has the columns {listed}; `hf-plugins {command}` needs {needs}: {hint}")
    for column, fix in (required_columns or {}).items():
        if column not in columns:
            raise UsageError(
                f"the {split} dataset has no `{column}` column (it has {listed}), which `hf-plugins {command}` needs: "
                f"{fix}"
            )
    missing = ", ".join(f"`{c}`" for c in tokenized_columns if found == "tokenized" and c not in columns)
    if missing:
        raise UsageError(
            f"the {split} dataset is already tokenized but has no {missing} column, which `hf-plugins {command}` "
            "needs: pass the conversations (`messages`) instead"
        )
    return found


def check_prompt_dataset(dataset, command: str, split: str) -> None:
    """A GRPO dataset has a `prompt` column (text, or a conversation to continue), as `trl grpo` reads it; else a
    `UsageError` naming its columns and the fix."""
    columns = _column_names(dataset)
    if "prompt" in columns:
        value = _first_value(dataset, "prompt")
        if value is None or isinstance(value, str) or _is_conversation(value):
            return
        raise UsageError(
            f"the {split} dataset's `prompt` column holds {type(value).__name__} values; `hf-plugins {command}` needs "
            "text prompts or conversations (lists of {'role': ..., 'content': ...} dicts)"
        )
    listed = ", ".join(f"`{c}`" for c in columns) or "none"
    hint = (
        "keep the turns before each assistant reply as `prompt` (e.g. `dataset.map(lambda row: {'prompt': "
        "row['messages'][:-1]})`)"
        if "messages" in columns
        else "rename the column of prompts (`dataset.rename_column(..., 'prompt')`)"
    )
    raise UsageError(
        f"the {split} dataset has the columns {listed}; `hf-plugins {command}` needs a `prompt` column (text or a "
        f"conversation), which the model completes: {hint}"
    )


def assistant_turns(dataset, column: str) -> tuple[int, int, int | None, set[str]]:
    """`(rows checked, rows without an assistant message, index of the first such row, roles seen)` of a column of
    conversations (`messages`, or the `completion` of conversational prompt-completion rows)."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        return _assistant_turns_arrow(dataset, column)
    return _assistant_turns_python(dataset, column, limit=STREAMING_ROWS_CHECKED)


def _assistant_turns_python(dataset, column: str, limit=None):
    checked, missing, first, roles = 0, 0, None, set()
    for index, row in enumerate(_rows(dataset, [column], limit=limit)):
        row_roles = {m.get("role") for m in row[column] or [] if isinstance(m, dict)}
        roles |= row_roles
        checked += 1
        if "assistant" not in row_roles:
            missing += 1
            first = index if first is None else first
    return checked, missing, first, roles


def _assistant_turns_arrow(dataset, column: str):
    """The same on the Arrow data, in batches, so that a large dataset is checked in seconds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    checked, missing, first, roles = 0, 0, None, set()
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=8192):
        values = batch.column(column).combine_chunks()
        if not pa.types.is_list(values.type) or not pa.types.is_struct(values.type.value_type):
            return _assistant_turns_python(dataset, column)
        flat = pc.list_flatten(values)
        parents = np.asarray(pc.list_parent_indices(values))
        role = flat.field("role") if flat.type.get_field_index("role") >= 0 else pa.nulls(len(flat), pa.string())
        has = np.zeros(len(values), dtype=bool)
        is_assistant = np.asarray(pc.fill_null(pc.equal(role, "assistant"), False))
        has[parents[is_assistant]] = True
        roles |= {r for r in pc.unique(role).to_pylist() if r is not None}
        lacking = np.flatnonzero(~has)
        if first is None and len(lacking):
            first = checked + int(lacking[0])
        missing += len(lacking)
        checked += len(values)
    return checked, missing, first, roles


def check_assistant_turns(
    dataset, found: str, split: str, assistant_only: bool, explicit: bool, every_row_needs_one: bool
) -> None:
    """Conversations without an assistant turn: with assistant-only loss TRL cannot mask them (`every_row_needs_one`:
    each row is checked); with the default settings a dataset where no conversation has one would silently train
    on the user's turns. An explicit `assistant_only_loss=False` trains on every token, as asked."""
    if found == "conversational":
        column = "messages"
    elif found == "prompt-completion" and assistant_only and _is_conversation(_first_value(dataset, "completion")):
        column = "completion"  # without assistant-only loss the completion is trained whatever its role
    else:
        return
    checked, missing, first, roles = assistant_turns(dataset, column)
    if not missing:
        return
    seen = ", ".join(sorted(map(str, roles))) or "none"
    where = f"`{column}` of the {split} dataset"
    if assistant_only and every_row_needs_one:
        raise UsageError(
            f"assistant_only_loss is on, but {missing} of the {checked} conversations in the {where} have no message "
            f"with role 'assistant' (first: row {first}; roles seen: {seen}), and TRL cannot mask those: drop them "
            "(`dataset.filter`), name the model's turns 'assistant', or pass --assistant_only_loss False"
        )
    if missing < checked:
        return
    if assistant_only:
        raise UsageError(
            f"none of the {checked} conversations in the {where} has a message with role 'assistant' (roles seen: "
            f"{seen}), and only assistant turns are trained: name the model's turns 'assistant'"
        )
    if not explicit:
        raise UsageError(
            f"none of the {checked} conversations in the {where} has a message with role 'assistant' (roles seen: "
            f"{seen}), so every token, the user's included, would be trained: name the model's turns 'assistant', "
            "or pass --assistant_only_loss False to train on every token anyway"
        )
