"""Offline scoring of a dataset's responses by aligned models, for PoFT (`score_with_aligned_models`).

Each aligned model scores every example once, in its own tokenisation: the conversation is rendered with that model's
own chat template, and the score is the mean log-prob of the response tokens only (the assistant message contents;
role headers, end-of-turn tokens and the prompt are context, not scored). The `ref_score` column is the arithmetic mean
of the models' scores. The forward pass stops at the last hidden state and the log-probs come from the chunked loss
head's no-grad pass, so no `[tokens, vocab]` logits are ever built.

Caching: each model's scores are one `datasets.map`, fingerprinted from the dataset's fingerprint, the model (its
files for a path, a sample of its weights for a loaded model), the tokenizer and chat template and the settings, and
written to a cache file. A second call with the same models and data loads the scores and runs no model (a model
given as a path is not even loaded).

Several processes (`accelerate launch`, `torchrun`): the main process scores first and writes the cache; the others
wait, then read it (node by node for node-local caches). Every process ends with the same column. Scoring is not
sharded across processes: the other processes idle while the main one scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..utils import get_logger, is_integer


logger = get_logger(__name__)

#: Bumped whenever what a score means changes, so that older cache files are not reused
SCORING_VERSION = "poft-aligned-score-v1"


# ---------------------------------------------------------------------------------------------------- responses


def _content_text(content) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [part for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "".join(part.get("text", "") for part in parts)
    return str(content)


def _locate(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """The span of `content` in `text` at or after `cursor` (or of its stripped form, as some templates strip)."""
    for candidate in (content, content.strip()):
        if candidate:
            start = text.find(candidate, cursor)
            if start >= 0:
                return start, start + len(candidate)
    return None


def response_spans(example: dict[str, Any], tokenizer) -> tuple[str, list[tuple[int, int]], bool]:
    """`(text, spans, chat)`: the text a model scores, the character spans of the response in it, and whether it was
    rendered with the chat template (then the template brings its own special tokens).

    - `messages`: the conversation in the tokenizer's chat template; the response is every assistant message's content.
    - `prompt` + `completion`, conversational: the prompt then the completion messages, rendered together; the response
      is the completion's assistant contents.
    - `prompt` + `completion`, plain text: `prompt + completion`; the response is the completion.
    - `text`: the whole text is the response.
    """
    if "messages" in example or ("prompt" in example and isinstance(example["prompt"], list)):
        if "messages" in example:
            messages, scored_from = list(example["messages"]), 0
        else:
            completion = example.get("completion")
            if not isinstance(completion, list):
                raise ValueError("A conversational `prompt` needs a conversational `completion` (a list of messages).")
            messages, scored_from = list(example["prompt"]) + list(completion), len(example["prompt"])
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"The aligned model's tokenizer ({type(tokenizer).__name__}, "
                f"{getattr(tokenizer, 'name_or_path', '')!r}) has no chat template, which conversational data "
                "needs: set `tokenizer.chat_template` and pass the tokenizer in `tokenizers=`."
            )
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        spans, cursor = [], 0
        # Every message is located in order (its content appears in the rendering), so that an assistant reply
        # repeating an earlier message's words is found at its own place
        for index, message in enumerate(messages):
            content = _content_text(message.get("content"))
            if not content:
                continue
            span = _locate(text, content, cursor)
            if span is None:
                if message.get("role") == "assistant" and index >= scored_from:
                    raise ValueError(
                        "The aligned model's chat template does not render an assistant message's content verbatim, "
                        f"so its tokens cannot be found: {content[:60]!r}. Use a template that keeps message contents."
                    )
                continue  # e.g. a template that drops system messages
            cursor = span[1]
            if message.get("role") == "assistant" and index >= scored_from:
                spans.append(span)
        return text, spans, True
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], False
    if "text" in example:
        return example["text"], [(0, len(example["text"]))], False
    raise ValueError(
        "Cannot find the response to score: examples need `messages`, `prompt` + `completion` (conversational or "
        f"plain text) or `text`, got columns {sorted(example)}."
    )


def tokenize_response(
    example: dict[str, Any], tokenizer, max_length: int | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered example and, per token, whether it is a scored response token (at least one
    character of the response inside it). Truncated to the first `max_length` tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "Scoring needs a fast tokenizer (with offsets to find the response tokens); "
            f"{type(tokenizer).__name__} is not one. Load it with `AutoTokenizer.from_pretrained(..., use_fast=True)`."
        )
    text, spans, chat = response_spans(example, tokenizer)
    encoding = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    scored = [
        end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
        for start, end in encoding["offset_mapping"]
    ]
    if max_length is not None:
        ids, scored = ids[:max_length], scored[:max_length]
    if scored:
        scored[0] = False  # nothing predicts the first token
    return ids, scored


# ---------------------------------------------------------------------------------------------------- the forward


@torch.no_grad()
def sequence_log_probs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sums, counts)`: per row of `input_ids` ([B, T]), the float64 sum of `log p(token)` over the tokens where
    `scored` ([B, T], bool) is True, and how many there are. From the model's last hidden state and the chunked
    head, with the model's logit soft-cap and scale (and no sampling temperature): never more than a `[chunk, V]`
    tile of logits. Any model patched (here) with `add_loss_head_forward`, PEFT ones through their own forward
    (adapters, virtual tokens). The first position of a row is never scored: nothing predicts it."""
    from ..modeling import add_loss_head_forward, forward_hidden_states, gather_lm_head
    from ..ops.chunked import chunked_label_log_probs, default_chunk_size

    # A PEFT model scores through its own forward (adapters, virtual tokens): the patch goes on its base model
    add_loss_head_forward(model.get_base_model() if hasattr(model, "get_base_model") else model)
    # The last hidden state at the example's own positions (PEFT's virtual tokens left out), without logits
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    outputs = forward_hidden_states(model, inputs)
    hidden, weight, bias = outputs.hidden_states, outputs.weight, outputs.bias
    # Position t predicts token t + 1
    rows = scored[:, 1:].to(hidden.device)
    labels = input_ids[:, 1:].to(hidden.device)[rows]
    with gather_lm_head(weight, bias):  # under DeepSpeed ZeRO-3 the head is sharded outside its own forward
        log_probs = chunked_label_log_probs(
            hidden[:, :-1][rows],
            weight,
            bias,
            labels.to(weight.device),
            chunk_size or default_chunk_size(weight.shape[0]),
            transform=outputs.logit_transform,
        )
    sequence = torch.arange(input_ids.shape[0], device=rows.device).unsqueeze(1).expand_as(rows)[rows]
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=rows.device)
    sums = sums.index_add(0, sequence, log_probs.double().to(rows.device))
    return sums, rows.sum(1)


@torch.no_grad()
def score_batch(
    model,
    batch_ids: Sequence[Sequence[int]],
    batch_scored: Sequence[Sequence[bool]],
    pad_token_id: int,
    chunk_size: int | None = None,
) -> list[float]:
    """Mean log-prob of the scored tokens of each example (NaN for an example without one), from the model's last
    hidden state and the chunked head (`sequence_log_probs`)."""
    device = next(model.parameters()).device
    length = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), length), dtype=torch.long)
    scored = torch.zeros((len(batch_ids), length), dtype=torch.bool)
    for row, (ids, mask) in enumerate(zip(batch_ids, batch_scored)):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        scored[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
    sums, counts = sequence_log_probs(model, input_ids, attention_mask, scored, chunk_size)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))
    return means.tolist()


# ---------------------------------------------------------------------------------------------------- fingerprints


def _hash(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """A fingerprint of a loaded model: its config and, per parameter, its name, shape, dtype and a strided sample of
    its values (a changed model almost surely changes a sampled value; reading a few thousand values per tensor keeps
    it fast for large models)."""
    parts = [type(model).__name__, model.config.to_json_string(use_diff=False)]
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu().numpy().tobytes()
        parts += [name, tuple(tensor.shape), str(tensor.dtype), float(flat.to(torch.float64).sum()), sample]
    return _hash(*parts)


def path_fingerprint(path: str, init_kwargs: dict[str, Any]) -> str:
    """A fingerprint of a model to load: the files of a local folder (names, sizes, modification times), or the Hub id
    (with its `revision`), and the loading arguments."""
    parts = [path, sorted((k, repr(v)) for k, v in init_kwargs.items())]
    if os.path.isdir(path):
        parts.append(os.path.abspath(path))
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                stat = os.stat(os.path.join(root, name))
                parts.append((os.path.relpath(os.path.join(root, name), path), stat.st_size, stat.st_mtime_ns))
    return _hash(*parts)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _hash(
        type(tokenizer).__name__,
        vocabulary,
        getattr(tokenizer, "chat_template", None),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        getattr(tokenizer, "add_bos_token", None),
    )


# ---------------------------------------------------------------------------------------------------- the entry point


class _AlignedModel:
    """One aligned model, loaded on first use (a cache hit never loads it)."""

    def __init__(self, model, tokenizer, init_kwargs, device):
        self.source, self.init_kwargs, self.device = model, init_kwargs, device
        self._model = None if isinstance(model, str) else model
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer()
        self.name = model if isinstance(model, str) else (model.config._name_or_path or type(model).__name__)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        path = self.source if isinstance(self.source, str) else self.source.config._name_or_path
        if not path:
            raise ValueError(
                "An aligned model given as a loaded model has no path to load its tokenizer from: pass its tokenizer "
                "in `tokenizers=` (one per model, in the same order)."
            )
        return AutoTokenizer.from_pretrained(path, trust_remote_code=self.init_kwargs.get("trust_remote_code", False))

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            kwargs = {"dtype": "auto", **self.init_kwargs}
            self._model = AutoModelForCausalLM.from_pretrained(self.source, **kwargs).to(self.device)
            self._model.eval()
        return self._model

    def fingerprint(self) -> str:
        if isinstance(self.source, str):
            return path_fingerprint(self.source, self.init_kwargs)
        return model_fingerprint(self.source)


def _as_list(value, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _default_device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def _check_scoring_arguments(dataset, column: str, batch_size, max_length) -> None:
    """Raise a `ValueError` naming the argument for a dataset or setting `score_with_aligned_models` cannot use."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"`dataset` must be a `datasets.Dataset` (scores are cached per example), got {type(dataset).__name__}. "
            "Materialise an IterableDataset first, e.g. `Dataset.from_generator(lambda: iter(iterable))`."
        )
    if column in dataset.column_names:
        raise ValueError(
            f"The dataset already has a `{column}` column: remove it (`dataset.remove_columns('{column}')`) or pass "
            "another `column=` name."
        )
    if not is_integer(batch_size) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if max_length is not None and (not is_integer(max_length) or max_length < 2):
        raise ValueError(f"`max_length` must be an integer >= 2 or None, got {max_length!r}.")


def _aligned_models(models, tokenizers, model_init_kwargs, device) -> list[_AlignedModel]:
    """One `_AlignedModel` per model (paths are not loaded yet), with its tokenizer; `ValueError` for a model that
    is neither a path nor a loaded model, or a tokenizer list that does not match the models."""
    models = _as_list(models, "models")
    if not models:
        raise ValueError("`models` is empty: pass at least one aligned model (a path or a loaded model).")
    for model in models:
        if not isinstance(model, (str, torch.nn.Module)):
            raise ValueError(
                f"Each aligned model must be a path / Hub id or a loaded model, got {type(model).__name__}."
            )
    tokenizers = _as_list(tokenizers, "tokenizers")
    if tokenizers and len(tokenizers) != len(models):
        raise ValueError(
            f"`tokenizers` has {len(tokenizers)} entries for {len(models)} models: pass one tokenizer per model, in "
            "the same order, or None to load each model's own."
        )
    init_kwargs = dict(model_init_kwargs or {})
    device = torch.device(device) if device is not None else _default_device()
    return [
        _AlignedModel(model, tokenizers[i] if tokenizers else None, init_kwargs, device)
        for i, model in enumerate(models)
    ]


def _score_cache_dir(dataset, cache_dir: str | None) -> str:
    """Where the score cache files go: `cache_dir`, else the dataset's own cache folder, else
    `<datasets cache>/hf_plugins/aligned_scores` for an in-memory dataset."""
    from datasets import config as datasets_config

    if cache_dir is not None:
        return cache_dir
    if dataset.cache_files:
        return os.path.dirname(dataset.cache_files[0]["filename"])
    return os.path.join(datasets_config.HF_DATASETS_CACHE, "hf_plugins", "aligned_scores")


def _score_fingerprint(dataset, entry: _AlignedModel, max_length: int | None) -> str:
    """The fingerprint of one model's scores of `dataset`: what they mean, the data, the model, its tokenizer and
    chat template, and the truncation."""
    return _hash(
        SCORING_VERSION, dataset._fingerprint, entry.fingerprint(), tokenizer_fingerprint(entry.tokenizer), max_length
    )[:32]


def _batch_scorer(entry: _AlignedModel, max_length: int | None, chunk_size: int | None):
    """The `datasets.map` function that scores a batch of rows with `entry`'s model (in eval mode while it runs)."""
    tokenizer = entry.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def score(batch):
        examples = [dict(zip(batch, values)) for values in zip(*batch.values())]
        tokenized = [tokenize_response(example, tokenizer, max_length) for example in examples]
        model = entry.model
        was_training = model.training
        model.eval()
        try:
            scores = score_batch(model, [t[0] for t in tokenized], [t[1] for t in tokenized], pad_token_id, chunk_size)
        finally:
            model.train(was_training)
        return {"score": scores}

    return score


def _mean_of_model_scores(per_model: list[np.ndarray], column: str, max_length: int | None) -> np.ndarray:
    """The mean over the models of each example's score, with a warning counting the examples left unscored (NaN)."""
    mean = np.mean(np.stack(per_model), axis=0) if len(per_model) > 1 else per_model[0]
    missing = int(np.isnan(mean).sum())
    if missing:
        logger.warning(
            f"{missing} of {len(mean)} examples have no response token to score (empty response, or cut by "
            f"max_length={max_length}): their `{column}` is NaN. PoFTTrainer refuses NaN scores: drop them with "
            f"`dataset.filter(lambda row: not math.isnan(row['{column}']))`."
        )
    return mean


def score_with_aligned_models(
    dataset,
    models,
    tokenizers=None,
    *,
    column: str = "ref_score",
    batch_size: int = 8,
    max_length: int | None = None,
    model_init_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    cache_dir: str | None = None,
    load_from_cache_file: bool = True,
):
    """Score every example's response with one or several aligned models and add their mean as a column.

    A model's score of an example is its mean per-token log-prob of the response tokens, in its own tokenisation and
    chat template: for `messages` the contents of the assistant messages, for `prompt` + `completion` the completion
    (for conversational data, its assistant contents), for `text` the whole text. Role headers, end-of-turn tokens and
    the prompt are context only. The column is the arithmetic mean over the models of their scores (PoFT's
    `ref_score`).

    Args:
        dataset ([`~datasets.Dataset`]): the SFT dataset, in one of TRL's formats (`messages`, `prompt` +
            `completion`, `text`). An `IterableDataset` is not supported (the scores are cached per example).
        models (`str`, [`~transformers.PreTrainedModel`] or a list of them): the aligned models, as paths / Hub ids
            (loaded with `AutoModelForCausalLM.from_pretrained`, only when the cache misses) or loaded models
            (used on their own device, in eval mode during scoring).
        tokenizers (tokenizer or list, *optional*): one per model, in order; default: loaded from each model's path.
            A tokenizer's `chat_template` is what renders conversations for its model.
        column (`str`, defaults to `"ref_score"`): the name of the added column (the one `PoFTTrainer` reads).
        batch_size (`int`, defaults to `8`): examples per forward pass.
        max_length (`int`, *optional*): keep the first `max_length` tokens of each rendered example. An example
            left without a response token scores NaN, and a warning gives their count: drop them before training.
        model_init_kwargs (`dict`, *optional*): `from_pretrained` arguments for models given as paths (`dtype`
            defaults to `"auto"`).
        device (*optional*): where models given as paths run; default: this process's accelerator device.
        chunk_size (`int`, *optional*): rows per tile of the log-prob head.
        cache_dir (`str`, *optional*): folder of the score cache files; default: the dataset's own cache folder, or
            `<datasets cache>/hf_plugins/aligned_scores` for an in-memory dataset.
        load_from_cache_file (`bool`, defaults to `True`): reuse cached scores when the fingerprint matches.

    Returns:
        [`~datasets.Dataset`]: `dataset` with the `column` column (float64) added.
    """
    from datasets.fingerprint import is_caching_enabled
    from trl.trainer.utils import global_then_local_main_first

    _check_scoring_arguments(dataset, column, batch_size, max_length)
    aligned = _aligned_models(models, tokenizers, model_init_kwargs, device)
    caching = is_caching_enabled() and load_from_cache_file
    cache_dir = _score_cache_dir(dataset, cache_dir)

    per_model = []
    for index, entry in enumerate(aligned):
        fingerprint = _score_fingerprint(dataset, entry, max_length)
        score = _batch_scorer(entry, max_length, chunk_size)
        map_kwargs = dict(
            batched=True,
            batch_size=batch_size,
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            load_from_cache_file=load_from_cache_file,
            desc=f"Scoring with aligned model {index + 1}/{len(aligned)} ({entry.name})",
        )
        if caching:
            os.makedirs(cache_dir, exist_ok=True)
            map_kwargs["cache_file_name"] = os.path.join(cache_dir, f"aligned-scores-{fingerprint}.arrow")
        # The global main process scores first and writes the cache, then each node's local main, then the rest
        with global_then_local_main_first():
            scores = dataset.map(score, **map_kwargs)
        per_model.append(np.asarray(scores["score"], dtype=np.float64))

    mean = _mean_of_model_scores(per_model, column, max_length)
    combined = _hash(dataset._fingerprint, column, *[entry.fingerprint() for entry in aligned])[:32]
    return dataset.add_column(column, mean.tolist(), new_fingerprint=combined)
