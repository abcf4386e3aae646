"""Tests of the offline fixtures in `hf_plugins.testing`: tokenizer, chat template, tiny models and datasets."""

import math
import statistics

import pytest
import torch
from testing_utils import logged
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained
from trl.data_utils import is_conversational

from hf_plugins.testing import (
    CHAT_TEMPLATE,
    CPU_TRAINING_ARGS,
    IM_END,
    IM_START,
    build_tiny_model,
    build_tokenizer,
    tiny_conversational_dataset,
    tiny_language_modeling_dataset,
    tiny_prompt_completion_dataset,
)


SENTENCE = "What is the capital of France? The capital of France is Paris, and 7 plus 8 is 15."

TWO_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The colour of the sky is blue."},
]


@pytest.fixture(scope="module")
def tokenizer():
    """One tokenizer built in memory, shared by the read-only tests of this module."""
    return build_tokenizer()


def _masked_spans(input_ids, mask):
    """Contiguous runs of masked token ids, so each assistant turn can be checked on its own."""
    spans, current = [], []
    for token_id, bit in zip(input_ids, mask, strict=True):
        if bit:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def _sft_config(output_dir, **kwargs):
    """The small CPU configuration shared by the SFT smoke tests."""
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        **{**CPU_TRAINING_ARGS, **kwargs},
    )


def _assert_finite_losses(trainer):
    """Three steps ran and every logged training loss is a finite number."""
    assert trainer.state.global_step == 3
    losses = logged(trainer)
    assert len(losses) == 3
    assert all(math.isfinite(loss) for loss in losses), losses


def _assert_collated_labels_inside(trainer, allowed):
    """In one collated batch, every label that is not -100 is the input id at a position of `allowed`.

    Args:
        trainer: The trainer whose train dataset and collator are checked.
        allowed: One list of 0/1 per row of the train dataset, 1 where the row may carry a label.
    """
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    for row, (input_ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
        n = len(allowed[row])
        assert (labels[n:] == -100).all(), "padding must not be trained"
        for position in range(n):
            if labels[position] != -100:
                assert allowed[row][position] == 1, (row, position)
                assert labels[position] == input_ids[position]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic():
    first, second = build_tokenizer(), build_tokenizer()
    assert first(SENTENCE)["input_ids"] == second(SENTENCE)["input_ids"]
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 384
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None
    for token in (IM_START, IM_END, "<|endoftext|>", "<|pad|>"):
        assert len(tokenizer(token)["input_ids"]) == 1, token
    # No special token is added around plain text: TRL and the chat template add what they need.
    assert tokenizer(SENTENCE)["input_ids"] == tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]


def test_tokenizer_round_trips_any_text(tokenizer):
    # The byte-level alphabet covers text the corpus never contained.
    text = "Zebras & naïve façades — 東京 🚀\ttabs\n\nand  spaces "
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_vocab_size_option():
    assert len(build_tokenizer(vocab_size=320)) == 320
    with pytest.raises(ValueError, match="at least"):
        build_tokenizer(vocab_size=100)


def test_dataset_examples_are_short(tokenizer):
    # The corpus holds the datasets' words, so a typical example takes a few dozen tokens, not hundreds of bytes.
    lengths = [
        len(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
        for messages in tiny_conversational_dataset(n=64)["messages"]
    ]
    assert 20 <= statistics.median(lengths) <= 60, lengths
    assert max(lengths) < 160


# --------------------------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------------------------


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    full = tokenizer.apply_chat_template(TWO_TURNS[:3], tokenize=False)
    assert full == text + "3 plus 4 is 7.<|im_end|>\n"


def test_chat_template_accepts_content_parts(tokenizer):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "What is 3 plus 4?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3 plus 4 is 7."}]},
    ]
    plain = [{"role": message["role"], "content": message["content"][0]["text"]} for message in parts]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == tokenizer.apply_chat_template(plain, tokenize=False)


def test_assistant_masks_cover_content_and_end_of_turn(tokenizer):
    output = tokenizer.apply_chat_template(TWO_TURNS, return_dict=True, return_assistant_tokens_mask=True)
    spans = _masked_spans(output["input_ids"], output["assistant_masks"])
    expected = [message["content"] + IM_END for message in TWO_TURNS if message["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in spans] == expected
    # The header is not trained: the token just before each span is the newline that ends `<|im_start|>assistant`.
    ids, mask = output["input_ids"], output["assistant_masks"]
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    for start in starts:
        assert tokenizer.decode(ids[start - 3 : start]) == "<|im_start|>assistant\n"


def test_chat_template_passes_trl_checks(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3_moe", "gpt_oss", "gemma2", "cohere", "granite"])
def test_build_tiny_model(tokenizer, arch):
    model = build_tiny_model(tokenizer, arch=arch)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.bos_token_id is None
    assert model.config.max_position_embeddings == 512
    input_ids = torch.tensor([tokenizer(SENTENCE)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_build_tiny_model_is_seeded(tokenizer):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_model(tokenizer, seed=0)
    # Building a model leaves the caller's random stream where it was.
    assert torch.equal(torch.rand(3), expected_draw)
    second = build_tiny_model(tokenizer, seed=0)
    other = build_tiny_model(tokenizer, seed=1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    weight = "model.embed_tokens.weight"
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_build_tiny_model_options(tokenizer):
    model = build_tiny_model(
        tokenizer, arch="qwen2", hidden_size=64, num_layers=1, tie_word_embeddings=True, dtype=torch.bfloat16
    )
    assert model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 1
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_build_tiny_model_rejects_unknown_arch(tokenizer):
    with pytest.raises(ValueError, match="'llama', 'qwen2'"):
        build_tiny_model(tokenizer, arch="gpt2")


@pytest.mark.parametrize("fixture_name, arch", [("tiny_model_dir", "llama"), ("tiny_qwen2_model_dir", "qwen2")])
def test_save_and_reload_is_identical(request, tokenizer, fixture_name, arch):
    path = request.getfixturevalue(fixture_name)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(path)
    reloaded_model = AutoModelForCausalLM.from_pretrained(path)
    # `qwen2` folders reload through transformers' `Qwen2Tokenizer`, which rebuilds the pipeline: it must match.
    assert reloaded_tokenizer.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert reloaded_tokenizer(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert reloaded_tokenizer.apply_chat_template(TWO_TURNS, return_dict=True, return_assistant_tokens_mask=True) == (
        tokenizer.apply_chat_template(TWO_TURNS, return_dict=True, return_assistant_tokens_mask=True)
    )
    assert (reloaded_tokenizer.eos_token, reloaded_tokenizer.pad_token, reloaded_tokenizer.bos_token) == (
        IM_END,
        "<|pad|>",
        None,
    )

    # the session fixtures save their weights in float64 (tests/conftest.py)
    assert reloaded_model.dtype == torch.float64
    model = build_tiny_model(tokenizer, arch=arch, dtype=torch.float64)
    input_ids = torch.tensor([tokenizer(SENTENCE)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded_model(input_ids).logits, model(input_ids).logits)
    assert reloaded_model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert reloaded_model.generation_config.pad_token_id == tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def test_conversational_dataset():
    dataset = tiny_conversational_dataset(n=40)
    assert dataset.column_names == ["messages"]
    assert len(dataset) == 40
    assert dataset[:] == tiny_conversational_dataset(n=40)[:]
    assert dataset[:] != tiny_conversational_dataset(n=40, seed=1)[:]
    assert is_conversational(dataset[0])
    n_assistant_turns = []
    for messages in dataset["messages"]:
        roles = [message["role"] for message in messages]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2)
        assert all(message["content"] for message in messages)
        n_assistant_turns.append(len(body) // 2)
    assert max(n_assistant_turns) > 1
    assert min(n_assistant_turns) == 1
    single = tiny_conversational_dataset(n=40, multi_turn=False)
    assert all(sum(message["role"] == "assistant" for message in row) == 1 for row in single["messages"])


def test_prompt_completion_dataset(tokenizer):
    dataset = tiny_prompt_completion_dataset(n=16)
    assert dataset.column_names == ["prompt", "completion"]
    assert dataset[:] == tiny_prompt_completion_dataset(n=16)[:]
    assert not is_conversational(dataset[0])
    for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True):
        # The prompt's tokens are a prefix of the prompt + completion tokens, so the completion mask is exact.
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt + completion)["input_ids"][: len(prompt_ids)] == prompt_ids

    conversational = tiny_prompt_completion_dataset(n=16, conversational=True)
    assert is_conversational(conversational[0])
    for prompt, completion in zip(conversational["prompt"], conversational["completion"], strict=True):
        assert prompt[-1]["role"] == "user"
        assert [message["role"] for message in completion] == ["assistant"]


def test_language_modeling_dataset():
    dataset = tiny_language_modeling_dataset(n=8)
    assert dataset.column_names == ["text"]
    assert dataset[:] == tiny_language_modeling_dataset(n=8)[:]
    assert all(text.startswith("Question: ") for text in dataset["text"])


# --------------------------------------------------------------------------------------------------------------------
# TRL smoke tests
# --------------------------------------------------------------------------------------------------------------------


def test_sft_assistant_only_loss(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = tiny_conversational_dataset(n=12)
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(tmp_path, assistant_only_loss=True),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )

    # TRL folds the assistant masks into the labels and drops them, so recompute them from the template.
    masks = []
    for messages, row in zip(dataset["messages"], trainer.train_dataset, strict=True):
        output = tiny_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert row["input_ids"] == output["input_ids"]
        mask = output["assistant_masks"]
        assert [label != -100 for label in row["labels"]] == [bool(bit) for bit in mask]
        masks.append(mask)
    _assert_collated_labels_inside(trainer, masks)

    trainer.train()
    _assert_finite_losses(trainer)


def test_sft_prompt_completion(tiny_qwen2_model_dir, tmp_path):
    # The folder is passed by name, as a Hub id would be: TRL loads the model and the tokenizer from it.
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_model_dir)
    dataset = tiny_prompt_completion_dataset(n=12)
    trainer = SFTTrainer(model=tiny_qwen2_model_dir, args=_sft_config(tmp_path), train_dataset=dataset)
    assert trainer.completion_only_loss

    masks = []
    for example, row in zip(dataset, trainer.train_dataset, strict=True):
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        # TRL appends the eos token to the completion, which is what teaches the model to stop.
        full_ids = tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"]
        assert row["input_ids"] == full_ids
        mask = [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))
        assert [label != -100 for label in row["labels"]] == [bool(bit) for bit in mask]
        masks.append(mask)
    _assert_collated_labels_inside(trainer, masks)

    trainer.train()
    _assert_finite_losses(trainer)


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_sft_conversational_prompt_completion(tiny_tokenizer, tiny_model_dir, tmp_path, assistant_only_loss):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = tiny_prompt_completion_dataset(n=8, conversational=True)
    args = _sft_config(tmp_path, assistant_only_loss=assistant_only_loss)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    for example, row in zip(dataset, trainer.train_dataset, strict=True):
        prompt_ids = tiny_tokenizer.apply_chat_template(
            example["prompt"], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        trained = [token_id for token_id, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        # The completion mask runs to the end of the rendered text, newline after `<|im_end|>` included; the
        # assistant mask, intersected with it, stops at `<|im_end|>`.
        expected = example["completion"][0]["content"] + IM_END + ("" if assistant_only_loss else "\n")
        assert tiny_tokenizer.decode(trained) == expected
    trainer.train()
    _assert_finite_losses(trainer)
