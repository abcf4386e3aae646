r"""TruthRL's truthfulness reward (arXiv 2509.25760), as a reward function for TRL's `GRPOTrainer`.

The scorer follows the reference verl code (`reward_score/truthrl_qa.py`), rule by rule, in its order:

1. the answer is the first `\boxed{...}` of the completion, stripped; without one the completion is `no_boxed`;
2. it is normalised as SQuAD's `normalize_answer`: lower-case, punctuation removed, the articles a / an / the
   removed, whitespace collapsed (`"I don't know."` becomes `"i dont know"`);
3. an answer that contains an abstention phrase (`"i dont know"`) is an `abstain`;
4. an answer that contains `"invalid question"` is an `invalid_question`, scored as a hallucination (the reference
   code checks it before the gold answers, so it is -1 even when the gold answer is "invalid question");
5. an answer equal to the normalised form of any gold answer is `correct`;
6. otherwise the judge, if there is one, is asked about each gold answer: any yes makes it `correct`;
7. everything else is a `hallucination`.

| outcome | `ternary` | `binary` |
|---|---|---|
| `correct` | +1 | +1 |
| `abstain` | 0 | -1 |
| `hallucination`, `invalid_question`, `no_boxed` | -1 | -1 |

The out-of-knowledge variants (`ternary_ook`, `binary_ook`) read a boolean column: on a question flagged out of the
model's knowledge an abstention is `correct` (+1) and any other answer a `hallucination` (-1), without the judge;
the other questions are scored as in `ternary` / `binary`.

**Nested braces.** The reference code reads the answer with the non-greedy regex `\\boxed{(.*?)}`, which stops at the
first `}`: `\boxed{\text{Paris}}` gives `\text{Paris`, which normalises to `textparis`. That is the default
(`balanced_braces=False`), so rewards are the reference code's. `balanced_braces=True` reads up to the matching
brace instead (`\text{Paris}`, then `textparis` too, but `\boxed{\{1, 2\}}` gives `\{1, 2\}`), and a box that is
never closed is `no_boxed`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..data.tool_calls import message_text


#: The reward schemes: `ternary` (TruthRL), `binary` (the vanilla-RL baseline: abstaining is wrong) and their
#: out-of-knowledge variants, which reward abstaining on questions flagged as beyond the model's knowledge
TRUTHRL_SCHEMES = ("ternary", "binary", "ternary_ook", "binary_ook")

#: The outcomes of a completion, each with its reward under `ternary` and `binary` (TruthRL's categories: correct,
#: abstention, hallucination; a missing box and "invalid question" are hallucinations, as the reference code scores
#: them)
TRUTHRL_OUTCOMES: dict[str, dict[str, float]] = {
    "correct": {"ternary": 1.0, "binary": 1.0},
    "abstain": {"ternary": 0.0, "binary": -1.0},
    "hallucination": {"ternary": -1.0, "binary": -1.0},
    "invalid_question": {"ternary": -1.0, "binary": -1.0},
    "no_boxed": {"ternary": -1.0, "binary": -1.0},
}

#: The reference code's abstention phrase, normalised
DEFAULT_ABSTAIN_PHRASES = ("i dont know",)

#: A system prompt asking for the final answer in `\boxed{}` and for `\boxed{I don't know}` when unsure (the paper's
#: exact wording is not public)
TRUTHRL_SYSTEM_PROMPT = (
    "Answer the question truthfully. Put your final answer in \\boxed{}, for example \\boxed{Paris}. If you do not "
    "know the answer, do not guess: answer \\boxed{I don't know}."
)

#: A batched judge: a list of `(question, gold answer, prediction)` triples in, one verdict (truthy: correct) per
#: triple out
Judge = Callable[[list[tuple[str, str, str]]], Sequence[Any]]

_BOXED = re.compile(r"\\boxed{(.*?)}", re.DOTALL)  # the reference code's pattern
_BOX_START = re.compile(r"\\boxed{")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_INVALID_QUESTION = "invalid question"
# Keyword arguments GRPOTrainer adds to the dataset columns
_NOT_COLUMNS = ("trainer_", "log_", "completion_ids", "environments")
# The judge is checked once with a question whose answer every judge must accept
_PROBE = ("What is the capital of France?", "Paris", "Paris")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation, as TruthRL's scorer applies it: lower-case, remove punctuation, remove the
    articles a / an / the, collapse whitespace."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_boxed(text: str, balanced_braces: bool = False) -> str | None:
    r"""The content of the first `\boxed{...}` of `text`, stripped, or None if there is none (never raises).

    By default it ends at the first `}` (the reference code's non-greedy regex: `\boxed{\frac{1}{2}}` gives
    `\frac{1`); with `balanced_braces=True` at the brace that closes the box (`\frac{1}{2}`), and an unclosed box
    gives None."""
    if not isinstance(text, str):
        return None
    if not balanced_braces:
        match = _BOXED.search(text)
        return match.group(1).strip() if match else None
    start = _BOX_START.search(text)
    if start is None:
        return None
    depth, index = 1, start.end()
    while index < len(text):
        char = text[index]
        if char == "\\":  # an escaped character (`\{`, `\}`, `\frac`) is text, not a brace
            index += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[start.end() : index].strip()
        index += 1
    return None


def completion_text(completion: Any) -> str:
    """The text of a completion as GRPOTrainer passes it: a string, or (conversational prompts) a list of messages
    whose assistant turns are joined, or one message. Anything else is empty text."""
    try:
        if isinstance(completion, str):
            return completion
        if isinstance(completion, Mapping):
            return message_text(completion.get("content"))
        if isinstance(completion, list):
            messages = [m for m in completion if isinstance(m, Mapping)]
            assistant = [m for m in messages if m.get("role") == "assistant"] or messages
            return "".join(message_text(m.get("content")) for m in assistant)
    except Exception:  # noqa: BLE001 - an unreadable completion has no box, which the scorer counts as no_boxed
        pass
    return ""


def _question(prompt: Any) -> str:
    """The question a judge sees: the prompt text, or the last user turn of a conversational prompt."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        return message_text(users[-1].get("content")) if users else ""
    return prompt if isinstance(prompt, str) else ""


def _gold_answers(value: Any) -> list[str]:
    """A row's gold answers: a string, or a list of them; None and empty entries are dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value if item is not None and str(item).strip()]
    return [str(value)]


def _flag(value: Any) -> bool:
    """An out-of-knowledge flag: a bool, a number (non-zero) or a string such as "true" / "1" / "yes"."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    try:
        return bool(value) and value == value  # NaN is not a flag
    except Exception:  # noqa: BLE001 - an unreadable flag is not set
        return False


def truthrl_outcome(
    completion: Any,
    answers: Any,
    *,
    out_of_knowledge: bool = False,
    abstain_phrases: Sequence[str] = DEFAULT_ABSTAIN_PHRASES,
    balanced_braces: bool = False,
) -> str:
    """The outcome of one completion without a judge (a key of `TRUTHRL_OUTCOMES`; an answer a judge could still
    accept is a `hallucination`). Never raises. `abstain_phrases` are matched after normalisation, as substrings."""
    outcome, _ = _rule_outcome(
        completion, _gold_answers(answers), out_of_knowledge, _normalized_phrases(abstain_phrases), balanced_braces
    )
    return outcome


def _normalized_phrases(phrases: Sequence[str]) -> tuple[str, ...]:
    if isinstance(phrases, str):
        phrases = (phrases,)
    normalized = tuple(normalize_answer(phrase) for phrase in phrases)
    if not normalized or not all(normalized):
        raise ValueError(
            f"`abstain_phrases={tuple(phrases)!r}` must be non-empty phrases with a word each after normalisation "
            "(e.g. ('i dont know',))."
        )
    return normalized


def _rule_outcome(
    completion: Any, golds: list[str], out_of_knowledge: bool, phrases: tuple[str, ...], balanced_braces: bool
) -> tuple[str, str | None]:
    """(outcome, the boxed answer when the judge should see it, else None)."""
    answer = extract_boxed(completion_text(completion), balanced_braces)
    if answer is None:
        return "no_boxed", None
    normalized = normalize_answer(answer)
    abstains = any(phrase in normalized for phrase in phrases)
    if out_of_knowledge:
        return ("correct" if abstains else "hallucination"), None
    if abstains:
        return "abstain", None
    if _INVALID_QUESTION in normalized:
        return "invalid_question", None
    if any(normalize_answer(gold) == normalized for gold in golds):
        return "correct", None
    return "hallucination", (answer if golds else None)


def _judge_name(judge) -> str:
    return getattr(judge, "__qualname__", None) or type(judge).__name__


def _call_judge(judge, items: list[tuple[str, str, str]]) -> list[bool]:
    try:
        verdicts = judge(items)
    except Exception as error:
        raise ValueError(
            f"the TruthRL judge {_judge_name(judge)} raised {type(error).__name__}: {error} (it is called with a list "
            "of (question, gold answer, prediction) triples and returns one verdict per triple)"
        ) from error
    try:
        verdicts = list(verdicts)
    except TypeError:
        verdicts = None
    if verdicts is None or len(verdicts) != len(items):
        raise ValueError(
            f"the TruthRL judge {_judge_name(judge)} returned {verdicts!r} for {len(items)} (question, gold answer, "
            "prediction) triples: it must return one verdict (True: correct) per triple, in order"
        )
    return [bool(verdict) for verdict in verdicts]


def make_truthrl_reward(
    answers_column: str = "answers",
    scheme: str = "ternary",
    ook_column: str | None = None,
    judge: Judge | None = None,
    abstain_phrases: Sequence[str] = DEFAULT_ABSTAIN_PHRASES,
    *,
    balanced_braces: bool = False,
    check_judge: bool = True,
    log_prefix: str = "truthrl",
) -> Callable[..., list[float]]:
    r"""TruthRL's reward for `trl.GRPOTrainer(reward_funcs=[...])` (and `FusedGRPOTrainer`); see the module docstring
    for the rules. The returned function is named `truthrl_reward` (GRPOTrainer logs rewards by name).

    Args:
        answers_column (`str`, defaults to `"answers"`): the dataset column of gold answers (a string or a list of
            strings per row).
        scheme (`str`, defaults to `"ternary"`): `"ternary"` (correct +1, abstain 0, hallucination -1), `"binary"`
            (abstain -1), `"ternary_ook"` / `"binary_ook"` (abstaining on an out-of-knowledge question is +1).
        ook_column (`str`, *optional*): the boolean column flagging out-of-knowledge questions, for the `*_ook`
            schemes (default `"out_of_knowledge"`, the reference data's name).
        judge (`callable`, *optional*): a batched judge for answers that match no gold answer exactly: called once
            per reward call, only if some completion needs it, with the list of `(question, gold answer, prediction)`
            triples of those completions (one per gold answer); it returns one verdict per triple, and any true
            verdict makes the completion correct. None (the default, offline): exact match only, the reference
            code's `ternary_EM`. The question is the prompt (the last user turn of a conversation).
        abstain_phrases (sequence of `str`, defaults to `("i dont know",)`): phrases that mark an abstention when the
            normalised answer contains one; normalised the same way.
        balanced_braces (`bool`, defaults to `False`): read the box up to its matching brace instead of the first
            `}` (see "Nested braces" in the module docstring).
        check_judge (`bool`, defaults to `True`): call the judge once here, on `("What is the capital of France?",
            "Paris", "Paris")`, so that a judge that fails or returns no verdict per triple is reported before
            training. Its verdict is not checked.
        log_prefix (`str`, defaults to `"truthrl"`): the metrics' prefix.

    Through TRL's `log_metric` it logs, per reward call, the fractions `truthrl/accuracy`, `truthrl/abstain`,
    `truthrl/hallucination` (1 - accuracy - abstain), `truthrl/truthfulness` (accuracy - hallucination) and
    `truthrl/no_boxed`; TRL averages them over the logging interval and the processes. The outcome of each
    completion goes to the completions table (`log_extra`) as `truthrl_outcome`.

    A malformed completion (no box, not text) is scored, never raises. A missing column, a judge that raises or
    returns no verdict per triple raise a `ValueError` naming it.
    """
    if scheme not in TRUTHRL_SCHEMES:
        raise ValueError(f"`scheme={scheme!r}` is not a TruthRL scheme: choose one of {', '.join(TRUTHRL_SCHEMES)}.")
    ook = scheme.endswith("_ook")
    if ook_column is not None and not ook:
        raise ValueError(
            f"`ook_column={ook_column!r}` is read only by the out-of-knowledge schemes: set `scheme='{scheme}_ook'`, "
            "or drop `ook_column`."
        )
    if ook and ook_column is None:
        ook_column = "out_of_knowledge"
    phrases = _normalized_phrases(abstain_phrases)
    if judge is not None:
        if not callable(judge):
            raise ValueError(
                f"`judge` must be a callable taking a list of (question, gold answer, prediction) triples, got "
                f"{type(judge).__name__}."
            )
        if check_judge:
            _call_judge(judge, [_PROBE])
    base_scheme = scheme.removesuffix("_ook")
    columns = [answers_column, *([ook_column] if ook else [])]

    def truthrl_reward(prompts=None, completions=None, log_metric=None, log_extra=None, **kwargs) -> list[float]:
        completions = list(completions or [])
        for column in columns:
            if column not in kwargs:
                what = "the gold answers" if column == answers_column else "the out-of-knowledge flag"
                raise ValueError(
                    f"truthrl_reward needs the dataset column `{column}` ({what} of each prompt); the batch has "
                    f"{sorted(k for k in kwargs if not k.startswith(_NOT_COLUMNS))}."
                )
        golds = [_gold_answers(value) for value in kwargs[answers_column]]
        flags = [_flag(value) for value in kwargs[ook_column]] if ook else [False] * len(completions)
        if len(golds) != len(completions) or len(flags) != len(completions):
            raise ValueError(
                f"truthrl_reward got {len(completions)} completions but {len(golds)} `{answers_column}` values: pass "
                "one per completion."
            )
        prompts = list(prompts) if prompts is not None else [""] * len(completions)
        outcomes, pending = [], []  # pending: (row, its boxed answer) for the judge
        for row, (completion, gold, flag) in enumerate(zip(completions, golds, flags)):
            outcome, for_judge = _rule_outcome(completion, gold, flag, phrases, balanced_braces)
            outcomes.append(outcome)
            if for_judge is not None and judge is not None:
                pending.append((row, for_judge))
        if pending:
            items, owners = [], []
            for row, answer in pending:
                question = _question(prompts[row] if row < len(prompts) else "")
                for gold in golds[row]:
                    items.append((question, gold, answer))
                    owners.append(row)
            for row, verdict in zip(owners, _call_judge(judge, items)):
                if verdict:
                    outcomes[row] = "correct"
        n = max(len(outcomes), 1)
        accuracy = outcomes.count("correct") / n
        abstain = outcomes.count("abstain") / n
        hallucination = 1.0 - accuracy - abstain if outcomes else 0.0
        if log_metric is not None:
            log_metric(f"{log_prefix}/accuracy", accuracy)
            log_metric(f"{log_prefix}/abstain", abstain)
            log_metric(f"{log_prefix}/hallucination", hallucination)
            log_metric(f"{log_prefix}/truthfulness", accuracy - hallucination)
            log_metric(f"{log_prefix}/no_boxed", outcomes.count("no_boxed") / n)
        if log_extra is not None:
            log_extra(f"{log_prefix}_outcome", outcomes)
        return [TRUTHRL_OUTCOMES[outcome][base_scheme] for outcome in outcomes]

    truthrl_reward.truthrl_settings = {
        "answers_column": answers_column,
        "scheme": scheme,
        "ook_column": ook_column,
        "judge": judge,
        "abstain_phrases": phrases,
        "balanced_braces": balanced_braces,
    }
    return truthrl_reward


#: TruthRL's ternary reward with its offline defaults (exact match, no judge): reads the dataset column `answers`
truthrl_reward = make_truthrl_reward()
