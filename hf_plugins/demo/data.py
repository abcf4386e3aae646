"""The English chatterbot corpus as a conversational `datasets.Dataset`.

The `chatterbot-corpus` wheel (BSD) holds short dialogues as YAML files, one per topic: each file has a
`conversations` list whose items are lists of utterances that alternate between two speakers. The demo reads them as
user/assistant turns. Of its 2,026 English conversations only 899 are distinct (the tech-support file repeats 10
question/answer pairs about a hundred times each); the duplicates are dropped, since they would only make the model
see the same ten answers over and over. Most conversations are one question and one answer.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import yaml
from datasets import Dataset, DatasetDict


_PACKAGE = "chatterbot_corpus"


def corpus_folder(language: str = "english") -> Path:
    """The folder of YAML files for `language` inside the installed `chatterbot-corpus` package.

    Raises:
        ImportError: the package is not installed.
        FileNotFoundError: it has no data for `language`.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The demo's data ships in the `chatterbot-corpus` wheel: `pip install chatterbot-corpus`.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    if not folder.is_dir():
        raise FileNotFoundError(f"chatterbot-corpus has no {language!r} data (looked in {folder}).")
    return folder


def _to_messages(utterances: list, system_prompt: str | None) -> list[dict[str, str]]:
    """Alternate user/assistant turns, starting with the user; a trailing unanswered question is dropped."""
    turns = [str(text).strip() for text in utterances]
    turns = turns[: len(turns) - len(turns) % 2]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    return messages


def _held_out(question: str, eval_fraction: float) -> bool:
    """Whether a conversation goes to the held-out split, decided by its opening question alone.

    The corpus repeats questions with different answers ("What is AI?" has several). Hashing the question keeps
    every copy on the same side, so held-out loss measures unseen questions rather than memorised ones, and the
    split is the same on every machine and Python run (unlike `hash`, which is salted per process).
    """
    digest = hashlib.sha256(question.strip().lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def load_chatterbot(
    eval_fraction: float = 0.05, system_prompt: str | None = None, language: str = "english"
) -> DatasetDict:
    """Load the chatterbot corpus as conversations with a deterministic train/held-out split.

    Args:
        eval_fraction: Share of distinct opening questions held out for evaluation.
        system_prompt: Put first in every conversation as a system message. With `None`, the model's chat
            template decides (SmolLM2's adds its own default system prompt).
        language: A data folder of the corpus.

    Returns:
        A `DatasetDict` with `train` and `test` splits and one column, `messages`, in TRL's conversational format:
        `[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]`. Exact duplicate
        conversations are kept once; rows are in file order (topics alphabetically), so shuffle for training.
    """
    splits: dict[str, list] = {"train": [], "test": []}
    seen: set[tuple[tuple[str, str], ...]] = set()
    # Sorted, so the rows come in the same order whatever order the file system lists them in.
    for path in sorted(corpus_folder(language).glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f) or {}
        for utterances in document.get("conversations") or []:
            messages = _to_messages(utterances, system_prompt)
            key = tuple((m["role"], m["content"]) for m in messages)
            if key in seen or not any(m["role"] == "assistant" for m in messages):
                continue
            seen.add(key)
            first_question = next(m["content"] for m in messages if m["role"] == "user")
            splits["test" if _held_out(first_question, eval_fraction) else "train"].append(messages)
    return DatasetDict({name: Dataset.from_dict({"messages": rows}) for name, rows in splits.items()})
