"""Offline fixtures: a tiny causal LM, a locally trained tokenizer and tiny datasets, all built in code.

Tests, examples and benchmarks need a model, a tokenizer with a chat template and a few datasets, but the machines
they run on may have no network access. Everything here is generated from templates in this module and is
deterministic: the same arguments always give the same tokenizer, the same weights and the same rows.

The tokenizer is a byte-level BPE trained on an English corpus that contains every word the tiny datasets use, so a
typical conversation is a few dozen tokens. Its ChatML template marks the assistant turns with
``{% generation %}``/``{% endgeneration %}``, which is what ``apply_chat_template(return_assistant_tokens_mask=True)``
and TRL's ``SFTTrainer(assistant_only_loss=True)`` rely on. ``TOOL_CHAT_TEMPLATE`` is the same template with tool
calling (tool signatures, ``<tool_call>`` JSON blocks, ``tool`` turns), for ``tiny_tool_calling_dataset``.

Example:
    ```python
    from hf_plugins.testing import build_tiny_model, build_tokenizer, tiny_conversational_dataset

    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer)
    dataset = tiny_conversational_dataset(n=8)
    ```
"""

from __future__ import annotations

import json
import os
import random
import zlib
from collections.abc import Iterator

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from .chat_templates import load_template
from .data.tool_calls import declared_tools
from .rewards import parse_tool_call
from .rewards.truthrl import TRUTHRL_SYSTEM_PROMPT


__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "CPU_TRAINING_ARGS",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "LOGIT_TRANSFORM_ARCHS",
    "MOE_ARCHS",
    "PAD_TOKEN",
    "ReplayedCompletions",
    "ReplayedToolCalls",
    "SPECIAL_TOKENS",
    "SUPPORTED_ARCHS",
    "TOOL_CHAT_TEMPLATE",
    "build_tiny_model",
    "build_tokenizer",
    "replayed_completion_reward",
    "save_tiny_model",
    "tiny_conversational_dataset",
    "tiny_language_modeling_dataset",
    "tiny_prompt_completion_dataset",
    "tiny_tool_calling_dataset",
    "tiny_truthrl_dataset",
]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = IM_END
# ChatML models (SmolLM2, Qwen2) have no beginning-of-sequence token; the first `<|im_start|>` plays that role.
BOS_TOKEN = None
# The order fixes the ids: 0..3, before the 256 byte-level symbols.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD_TOKEN)

# ChatML, as SmolLM2 and Qwen2 write it, with the assistant content wrapped in generation markers. `<|im_end|>` sits
# inside the markers so the model is trained to end its turn; the newline after it is outside, since generation stops
# at `<|im_end|>` and never emits it. Content may also be a list of `{"type": "text", "text": ...}` parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- content + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3_moe", "gpt_oss", "gemma2", "cohere", "granite")
#: The Mixture-of-Experts architectures of `SUPPORTED_ARCHS` (their configs enable the router load-balancing loss)
MOE_ARCHS = ("qwen3_moe", "gpt_oss")
#: The architectures of `SUPPORTED_ARCHS` that transform their logits after the lm_head: Gemma 2 soft-caps them
#: (`final_logit_softcapping`), Cohere multiplies them by `logit_scale`, Granite divides them by `logits_scaling`
LOGIT_TRANSFORM_ARCHS = ("gemma2", "cohere", "granite")
#: The transforms of the tiny models of `LOGIT_TRANSFORM_ARCHS`, chosen to act on the logits of a tiny random model
#: (std about 0.1): Gemma 2's real cap of 30 would never bite, so it caps at 0.5; Cohere keeps its real 0.0625;
#: Granite's `logits_scaling=0.25` multiplies by 4
TINY_LOGIT_TRANSFORMS = {
    "gemma2": {"final_logit_softcapping": 0.5},
    "cohere": {"logit_scale": 0.0625},
    "granite": {"logits_scaling": 0.25},
}

# The same ChatML with tool calling, in the `messages` + `tools` format of transformers chat templates: the shipped
# `hf_plugins/chat_templates/chatml_tools_training.jinja` (see its header). Without tools, tool calls or tool messages
# it renders exactly like `CHAT_TEMPLATE`.
TOOL_CHAT_TEMPLATE = load_template("chatml_tools")

# How text is cut into words before BPE, alternative by alternative: English contractions; a run of letters with at
# most one leading character that is neither a letter, a digit nor a line break (so " capital" is one word and a
# newline never sticks to the word after it); one digit (numbers are spelled digit by digit, as Qwen2 does); a run of
# punctuation with an optional leading space and trailing line breaks; line breaks with the spaces before them;
# trailing spaces; any other spaces. Merges never cross these boundaries, so a prompt that ends on punctuation
# tokenizes the same alone and followed by its completion. It must stay equal to the pattern of transformers'
# `Qwen2Tokenizer` (see `build_tokenizer`).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# --------------------------------------------------------------------------------------------------------------------
# Content templates shared by the corpus and the datasets
# --------------------------------------------------------------------------------------------------------------------

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer in one short sentence.",
    "You are a concise assistant.",
)

_CAPITALS = (
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Kenya", "Nairobi"),
)

_COLOURS = (
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("a banana", "yellow"),
    ("a tomato", "red"),
    ("coal", "black"),
    ("an orange", "orange"),
    ("a plum", "purple"),
)

_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)

_THANKS = (
    ("Thank you!", "You are welcome."),
    ("Thanks, that is right.", "Glad to help."),
    ("Great, thank you.", "You are welcome. Ask me anything else."),
)

#: Training arguments that make a tiny run fast, quiet and reproducible on CPU: shared by the tests, the benchmarks
#: and anything else that trains the tiny model. TRL's defaults (bf16, gradient checkpointing) assume a GPU.
CPU_TRAINING_ARGS = dict(
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    report_to="none",
    logging_steps=1,
    save_strategy="no",
    dataloader_num_workers=0,
    seed=0,
)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """One arithmetic question and its answer; single-digit operands keep the numbers to one or two tokens."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(("plus", "minus", "times"))
    if op == "minus" and b > a:
        a, b = b, a
    result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    question = rng.choice((f"What is {a} {op} {b}?", f"How much is {a} {op} {b}?"))
    return question, f"{a} {op} {b} is {result}."


def _capital(rng: random.Random) -> tuple[str, str]:
    """One question about a capital city and its answer."""
    country, city = rng.choice(_CAPITALS)
    question = rng.choice((f"What is the capital of {country}?", f"Which city is the capital of {country}?"))
    return question, f"The capital of {country} is {city}."


def _colour(rng: random.Random) -> tuple[str, str]:
    """One question about a colour and its answer."""
    thing, colour = rng.choice(_COLOURS)
    question = rng.choice((f"What colour is {thing}?", f"Tell me the colour of {thing}."))
    return question, f"The colour of {thing} is {colour}."


def _counting(rng: random.Random) -> tuple[str, str]:
    """One question about spelling a number as a word and its answer."""
    n = rng.randint(0, len(_NUMBER_WORDS) - 1)
    return f"How do you write {n} in words?", f"We write {n} as {_NUMBER_WORDS[n]}."


_QA_MAKERS = (_arithmetic, _capital, _colour, _counting)


def _qa(rng: random.Random) -> tuple[str, str]:
    """A question and answer drawn from one of the templates."""
    return rng.choice(_QA_MAKERS)(rng)


def _conversation(rng: random.Random, multi_turn: bool) -> list[dict[str, str]]:
    """A conversation: an optional system prompt, then one to three user/assistant exchanges."""
    messages = []
    if rng.random() < 0.75:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    n_turns = rng.choice((1, 1, 2, 3)) if multi_turn else 1
    for turn in range(n_turns):
        # A multi-turn conversation sometimes ends with thanks, which gives the assistant a turn that is not a fact.
        if turn > 0 and turn == n_turns - 1 and rng.random() < 0.3:
            question, answer = rng.choice(_THANKS)
        else:
            question, answer = _qa(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def _corpus(seed: int, n_conversations: int = 1500) -> Iterator[str]:
    """Training text for the tokenizer, shaped like the chat template renders the tiny datasets.

    Each message is yielded as `role` + newline + content, i.e. the text between the special tokens, so the merges
    are spent on what the datasets actually contain, in proportion: the role headers (in every turn), the system
    prompts and the words of the Q&A templates. The special tokens themselves are never in the text: they are added
    tokens, split off before the BPE model sees anything.
    """
    rng = random.Random(seed)
    for _ in range(n_conversations):
        for message in _conversation(rng, multi_turn=True):
            yield f"{message['role']}\n{message['content']}"
    for _ in range(n_conversations // 3):
        question, answer = _qa(rng)
        yield f"Question: {question}\nAnswer: {answer}"


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int = 384, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer with a ChatML chat template.

    The corpus is generated from this module's templates, so the same `seed` always gives the same vocabulary and
    merges, and the words of the tiny datasets are encoded in few tokens. The byte-level alphabet covers every
    UTF-8 string, so any text can be encoded (just in more tokens).

    Args:
        vocab_size (`int`, *optional*, defaults to `384`):
            Size of the vocabulary, including the 4 special tokens and the 256 byte symbols; must be at least 260.
            The corpus is small: training stops early (about 560 with the default corpus) once every word in it is
            a single token.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sampling of the training corpus.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: The tokenizer, with eos `<|im_end|>`, pad `<|pad|>`, no bos and
        a ChatML chat template whose assistant turns are wrapped in `{% generation %}` markers.
    """
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (special tokens + byte alphabet), got {vocab_size}.")

    # Same normalizer, pre-tokenizer and model options as transformers' `Qwen2Tokenizer`, which `AutoTokenizer` uses
    # for every `qwen2` checkpoint whatever its `tokenizer.json` says: any other pipeline would be silently replaced
    # when a qwen2 folder is reloaded. Llama folders load as saved, so one pipeline serves both architectures.
    tokenizer = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=""))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Untrimmed offsets keep every byte of the text attributed to a token, which the assistant mask computation
    # (overlap of token offsets with the `{% generation %}` spans) relies on.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        continuing_subword_prefix="",
        end_of_word_suffix="",
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START, ENDOFTEXT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int = 512,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    attention_dropout: float = 0.0,
) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM that matches `tokenizer`.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer the model is built for: the vocabulary size and the pad/eos/bos ids are taken from it.
        arch (`str`, *optional*, defaults to `"llama"`):
            `"llama"` for a [`~transformers.LlamaForCausalLM`], `"qwen2"` for a [`~transformers.Qwen2ForCausalLM`]
            (which adds biases to the q/k/v projections); the Mixture-of-Experts `"qwen3_moe"`
            ([`~transformers.Qwen3MoeForCausalLM`]) and `"gpt_oss"` ([`~transformers.GptOssForCausalLM`]), whose
            configs keep their architecture's router load-balancing coefficient (`router_aux_loss_coef`); and
            `"gemma2"`, `"cohere"` and `"granite"`, whose logits are transformed after the lm_head (a soft-cap of
            0.5, a scale of 0.0625, a division by 0.25: `TINY_LOGIT_TRANSFORMS`).
        hidden_size (`int`, *optional*, defaults to `32`):
            Width of the residual stream; must be a multiple of `num_heads`.
        num_layers (`int`, *optional*, defaults to `2`):
            Number of decoder layers.
        num_heads (`int`, *optional*, defaults to `4`):
            Number of attention heads.
        num_kv_heads (`int`, *optional*, defaults to `2`):
            Number of key/value heads; fewer than `num_heads` gives grouped-query attention.
        intermediate_size (`int`, *optional*, defaults to `64`):
            Width of the MLP.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the output projection shares the input embedding matrix.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation. The global torch RNG state is restored afterwards.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of the parameters.
        max_position_embeddings (`int`, *optional*, defaults to `512`):
            Longest sequence the rotary embeddings are set up for.
        num_experts (`int`, *optional*, defaults to `4`):
            Experts per MoE layer (MoE architectures only; `intermediate_size` is each expert's width).
        num_experts_per_tok (`int`, *optional*, defaults to `2`):
            Experts each token is routed to (MoE architectures only).
        attention_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the attention probabilities in training mode.

    Returns:
        [`~transformers.PreTrainedModel`]: The model, in eval mode as `from_pretrained` would return it.
    """
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {', '.join(repr(a) for a in SUPPORTED_ARCHS)}.")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}).")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")

    config_kwargs = dict(
        # `len(tokenizer)` counts the added tokens, which `tokenizer.vocab_size` leaves out for some tokenizers.
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=attention_dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # The MoE shapes of TRL's tiny test models: 4 experts, 2 per token, every layer sparse
    head_dim = hidden_size // num_heads
    if arch == "qwen3_moe":
        config_kwargs.update(
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=intermediate_size,
            head_dim=head_dim,
        )
    elif arch == "gpt_oss":
        # Plain rotary embeddings: GPT-OSS's YaRN scaling is set up for 131072 positions and warns at fewer
        config_kwargs.update(
            num_local_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            head_dim=head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        )
    elif arch == "gemma2":
        config_kwargs.update(head_dim=head_dim, query_pre_attn_scalar=head_dim)
    config_kwargs.update(TINY_LOGIT_TRANSFORMS.get(arch, {}))
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
        "gpt_oss": (GptOssConfig, GptOssForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "cohere": (CohereConfig, CohereForCausalLM),
        "granite": (GraniteConfig, GraniteForCausalLM),
    }[arch]
    config = config_cls(**config_kwargs)

    # Seed a forked RNG rather than the global one, so building a model in the middle of a test does not change the
    # random numbers the test draws afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.to(dtype)
    model.eval()
    # Generation must stop at the end of an assistant turn and pad with the tokenizer's pad token.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tiny_model(path: str | os.PathLike, arch: str = "llama", **kwargs) -> str:
    """Build a tokenizer and a tiny model and save both to `path`.

    The folder loads back with `AutoTokenizer.from_pretrained(path)` and `AutoModelForCausalLM.from_pretrained(path)`,
    or can be passed by name to any trainer that takes a model id.

    Args:
        path (`str` or `os.PathLike`):
            Folder to write to; created if missing.
        arch (`str`, *optional*, defaults to `"llama"`):
            Architecture, see [`build_tiny_model`].
        **kwargs:
            `vocab_size` and `tokenizer_seed` go to [`build_tokenizer`] (as `vocab_size` and `seed`); the rest go to
            [`build_tiny_model`].

    Returns:
        `str`: `path`, as a string.
    """
    tokenizer_kwargs = {}
    if "vocab_size" in kwargs:
        tokenizer_kwargs["vocab_size"] = kwargs.pop("vocab_size")
    if "tokenizer_seed" in kwargs:
        tokenizer_kwargs["seed"] = kwargs.pop("tokenizer_seed")
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    model = build_tiny_model(tokenizer, arch=arch, **kwargs)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def tiny_conversational_dataset(n: int = 32, seed: int = 0, multi_turn: bool = True) -> Dataset:
    """A conversational language-modeling dataset, in TRL's `messages` format.

    Each row is a list of `{"role", "content"}` messages: an optional system prompt, then user/assistant exchanges
    about arithmetic, capitals, colours and number words. With `multi_turn=True` about half of the rows have two or
    three exchanges.

    Args:
        n (`int`, *optional*, defaults to `32`):
            Number of rows.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the content; the same seed always gives the same rows.
        multi_turn (`bool`, *optional*, defaults to `True`):
            Whether some rows have more than one user/assistant exchange.

    Returns:
        [`~datasets.Dataset`]: A dataset with a single `messages` column.
    """
    rng = random.Random(seed)
    return Dataset.from_dict({"messages": [_conversation(rng, multi_turn) for _ in range(n)]})


def tiny_prompt_completion_dataset(n: int = 32, seed: int = 0, conversational: bool = False) -> Dataset:
    """A prompt-completion dataset, in TRL's standard or conversational format.

    In the standard format the prompt is `"Question: ...\nAnswer:"` and the completion starts with a space. The prompt
    never ends with whitespace, so the byte-level pre-tokenizer puts a token boundary between the two and the
    tokenized prompt is a prefix of the tokenized prompt + completion (which TRL's completion mask relies on).

    Args:
        n (`int`, *optional*, defaults to `32`):
            Number of rows.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the content; the same seed always gives the same rows.
        conversational (`bool`, *optional*, defaults to `False`):
            If `True`, `prompt` is a list of messages (an optional system prompt and a user turn) and `completion` a
            list holding one assistant message.

    Returns:
        [`~datasets.Dataset`]: A dataset with `prompt` and `completion` columns.
    """
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(n):
        question, answer = _qa(rng)
        if conversational:
            prompt = []
            if rng.random() < 0.5:
                prompt.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
            prompt.append({"role": "user", "content": question})
            prompts.append(prompt)
            completions.append([{"role": "assistant", "content": answer}])
        else:
            prompts.append(f"Question: {question}\nAnswer:")
            completions.append(f" {answer}")
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def tiny_language_modeling_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """A plain-text language-modeling dataset, in TRL's standard `text` format.

    Args:
        n (`int`, *optional*, defaults to `32`):
            Number of rows.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the content; the same seed always gives the same rows.

    Returns:
        [`~datasets.Dataset`]: A dataset with a single `text` column; each row is one to three Q&A pairs.
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        pairs = [_qa(rng) for _ in range(rng.randint(1, 3))]
        texts.append("\n".join(f"Question: {question}\nAnswer: {answer}" for question, answer in pairs))
    return Dataset.from_dict({"text": texts})


# Tools of the tiny tool-calling dataset: names that share token prefixes (`getPaper...`, `get_...`), so that key-token
# weighting has divergence points to find. Each maps parameter names to JSON-schema types.
_TOOLS = {
    "getPapersByKeywords": {"keywords": "string"},
    "getPaperDetails": {"paper_id": "string"},
    "getPaperAuthors": {"paper_id": "string"},
    "get_weather": {"city": "string"},
    "get_time": {"city": "string"},
    "finish": {"answer": "string"},
}

_TOPICS = ("llamas", "rivers", "bread", "music", "robots")


def _tool_schema(name: str) -> dict:
    """The JSON schema (transformers' `tools` format) of one of the tiny dataset's tools."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool.",
            "parameters": {
                "type": "object",
                "properties": {param: {"type": kind} for param, kind in _TOOLS[name].items()},
                "required": list(_TOOLS[name]),
            },
        },
    }


def _tool_task(rng: random.Random) -> tuple[str, str, dict, str, str]:
    """A user request, the tool that answers it, its arguments, a successful tool response and the final answer."""
    kind = rng.choice(("weather", "time", "papers", "details", "authors"))
    country, city = rng.choice(_CAPITALS)
    paper = f"P{rng.randint(1, 9)}"
    topic = rng.choice(_TOPICS)
    if kind == "weather":
        _, colour = rng.choice(_COLOURS)
        return (
            f"What is the weather in {city}?",
            "get_weather",
            {"city": city},
            json.dumps({"city": city, "sky": colour}),
            f"The sky in {city} is {colour}.",
        )
    if kind == "time":
        hour = rng.randint(1, 9)
        return (
            f"What time is it in {city}?",
            "get_time",
            {"city": city},
            json.dumps({"time": f"{hour}:00"}),
            f"It is {hour}:00 in {city}.",
        )
    if kind == "papers":
        return (
            f"Find papers about {topic}.",
            "getPapersByKeywords",
            {"keywords": topic},
            json.dumps([paper, f"P{rng.randint(1, 9)}"]),
            f"I found {paper} about {topic}.",
        )
    if kind == "details":
        return (
            f"Tell me about paper {paper}.",
            "getPaperDetails",
            {"paper_id": paper},
            json.dumps({"title": f"On {topic}"}),
            f"{paper} is called On {topic}.",
        )
    return (
        f"Who wrote paper {paper}?",
        "getPaperAuthors",
        {"paper_id": paper},
        json.dumps({"authors": [country]}),
        f"{paper} was written by {country}.",
    )


def _tool_call(name: str, arguments: dict) -> dict:
    # Arguments are stored as a JSON string: Arrow would otherwise merge the argument dicts of all rows into one struct
    # type and fill the keys a call does not have with None
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def tiny_tool_calling_dataset(
    n: int = 16, seed: int = 0, error_fraction: float = 0.3, final_answer: float = 0.6
) -> Dataset:
    """A tool-calling dataset in the `messages` + `tools` format of TRL and transformers chat templates.

    Each row has a user request, an assistant turn calling one of six tools (`getPapersByKeywords`,
    `getPaperDetails`, `getPaperAuthors`, `get_weather`, `get_time`, `finish`; the names share token prefixes), and
    usually the tool's response and a final answer. In about `error_fraction` of the rows the first call uses a wrong
    argument name, the tool answers with an error message, and the assistant then makes the corrected call. Each row
    declares four tools: the one it needs and three others. Render it with `TOOL_CHAT_TEMPLATE`.

    Args:
        n (`int`, *optional*, defaults to `16`): number of rows.
        seed (`int`, *optional*, defaults to `0`): seed of the content.
        error_fraction (`float`, *optional*, defaults to `0.3`): share of rows with an erroneous first call.
        final_answer (`float`, *optional*, defaults to `0.6`): share of rows that go on after the (correct) call with
            the tool's response and a final answer; the others end with the call.

    Returns:
        [`~datasets.Dataset`]: columns `messages`, `tools` (the JSON schemas, serialised as a JSON string, which TRL
        accepts) and `gold_call` (the correct call in the `name(key='value')` form, for rewards and evaluation).
    """
    rng = random.Random(seed)
    rows = {"messages": [], "tools": [], "gold_call": []}
    for _ in range(n):
        question, name, arguments, response, answer = _tool_task(rng)
        others = rng.sample([tool for tool in _TOOLS if tool != name], 3)
        declared = sorted([name, *others], key=lambda _: rng.random())
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": question})
        if rng.random() < error_fraction:
            ((param, value),) = arguments.items()
            wrong = rng.choice(("name", "query", "id"))
            messages.append({"role": "assistant", "content": None, "tool_calls": [_tool_call(name, {wrong: value})]})
            messages.append(
                {"role": "tool", "content": f"Error: {name}() got an unexpected keyword argument '{wrong}'"}
            )
        messages.append({"role": "assistant", "content": None, "tool_calls": [_tool_call(name, arguments)]})
        if rng.random() < final_answer:
            messages.append({"role": "tool", "content": response})
            messages.append({"role": "assistant", "content": answer})
        rows["messages"].append(messages)
        rows["tools"].append(json.dumps([_tool_schema(tool) for tool in declared]))
        rows["gold_call"].append(f"{name}(" + ", ".join(f"{k}='{v}'" for k, v in arguments.items()) + ")")
    return Dataset.from_dict(rows)


# --------------------------------------------------------------------------------------------------------------------
# GRPO: replayed completions
# --------------------------------------------------------------------------------------------------------------------


_TRUTHRL_NAMES = (
    "Mira", "Tomas", "Lena", "Ravi", "Ines", "Oskar", "Yuki", "Amara", "Bruno", "Chloe", "Dario", "Elif", "Farah",
    "Goran", "Hana", "Ivo", "Jonas", "Kira", "Luca", "Maya", "Nadia", "Omar", "Petra", "Quinn", "Rosa", "Sami",
)  # fmt: skip
#: Invented names for the unknowable questions: no context, so no model can know the answer
_TRUTHRL_STRANGERS = (
    "Zorvath Quillby", "Brindle Okafew", "Tazmir Vollens", "Quenby Arkwright", "Olwen Trasker", "Vesper Mungo",
    "Kesrin Dalloway", "Ulmo Fenwhistle", "Pryce Hollowell", "Idris Marrowby", "Sable Cortwin", "Fenna Rookwood",
)  # fmt: skip
_TRUTHRL_ATTRIBUTES = ("locker number", "house number", "room number", "bus number", "table number", "seat number")


def tiny_truthrl_dataset(
    n: int = 16, seed: int = 0, conversational: bool = False, unknowable_fraction: float = 0.5
) -> Dataset:
    """Synthetic question answering for TruthRL: *knowable* questions, whose fact is in the prompt ("Context: Mira's
    locker number is 47."), and *unknowable* ones about invented people, without context, whose gold answer is a
    random number that no answer can hit.

    Args:
        n (`int`, *optional*, defaults to `16`): number of rows.
        seed (`int`, *optional*, defaults to `0`): seed of the content.
        conversational (`bool`, *optional*, defaults to `False`): `prompt` as a conversation (TruthRL's system
            prompt, `hf_plugins.rewards.TRUTHRL_SYSTEM_PROMPT`, then the user turn) instead of `"...\nAnswer:"` text.
        unknowable_fraction (`float`, *optional*, defaults to `0.5`): the share of unknowable rows (alternating).

    Returns:
        [`~datasets.Dataset`]: columns `prompt`, `question`, `answers` (a list of one gold answer) and
        `out_of_knowledge` (True for the unknowable rows).
    """
    rng = random.Random(seed)
    rows = {"prompt": [], "question": [], "answers": [], "out_of_knowledge": []}
    unknowable_rows = round(n * unknowable_fraction)
    for index in range(n):
        unknowable = index * unknowable_rows // max(n, 1) != (index + 1) * unknowable_rows // max(n, 1)
        attribute, value = rng.choice(_TRUTHRL_ATTRIBUTES), str(rng.randint(10, 99))
        name = rng.choice(_TRUTHRL_STRANGERS if unknowable else _TRUTHRL_NAMES)
        question = f"What is {name}'s {attribute}?"
        context = "" if unknowable else f"Context: {name}'s {attribute} is {value}.\n"
        text = f"{context}Question: {question}"
        if conversational:
            prompt = [{"role": "system", "content": TRUTHRL_SYSTEM_PROMPT}, {"role": "user", "content": text}]
        else:
            prompt = f"{text}\nAnswer:"
        rows["prompt"].append(prompt)
        rows["question"].append(question)
        rows["answers"].append([value])
        rows["out_of_knowledge"].append(unknowable)
    return Dataset.from_dict(rows)


class ReplayedCompletions:
    """A `rollout_func` for TRL's `GRPOTrainer` (and `FusedGRPOTrainer`) that replays a fixed bank of completions
    instead of sampling: two trainers, or two runs of one (another process count, a resumed run), then train on
    exactly the same completions, which seeded sampling cannot promise (a 1e-7 change in a parameter can flip a
    sampled token).

    Each prompt of a call gets the bank entry `(crc32(prompt) + k) % len(bank)`, `k` the number of times the prompt
    came before it in the call, so the `num_generations` copies of a prompt get different completions. The bank holds
    `bank_size` token-id lists of the tokenizer's ordinary tokens (no special token), of lengths 1 to
    `max_completion_length`: about half end with the EOS token, and every third one fills `max_completion_length`
    without it (truncated, for `mask_truncated_completions`). `prompt_ids` are the tokenizer's ids of the prompt
    text (use standard, not conversational, prompts). With `texts`, the bank is those completion texts instead, tokenized and
    ended with the EOS token (cut at `max_completion_length`), for rewards that read the text (e.g. TruthRL's boxed
    answers). With `logprobs=True` it also returns sampler log-probs (a
    deterministic function of each token and its position, as a vLLM sampler would report them), else `None`.

    Example:
        ```python
        rollout = ReplayedCompletions(tokenizer, max_completion_length=8)
        trainer = GRPOTrainer(model, reward_funcs=replayed_completion_reward, rollout_func=rollout, ...)
        ```
    """

    def __init__(
        self,
        tokenizer,
        max_completion_length: int,
        bank_size: int = 12,
        seed: int = 0,
        logprobs: bool = False,
        texts: list[str] | None = None,
    ):
        if max_completion_length < 2:
            raise ValueError(f"`max_completion_length` must be at least 2, got {max_completion_length}.")
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        if texts is not None:
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
            self.bank = [entry[:max_completion_length] for entry in ids]
            return
        rng = random.Random(seed)
        special = set(tokenizer.all_special_ids)
        ordinary = [i for i in range(len(tokenizer)) if i not in special]
        bank, rewards = [], set()
        while len(bank) < bank_size:
            kind = len(bank) % 3  # 0: ends with EOS, 1: truncated at the maximum length, 2: short, no EOS
            if kind == 1:
                length = max_completion_length
            else:
                length = rng.randint(1, max_completion_length - 1)
            ids = [rng.choice(ordinary) for _ in range(length)]
            if kind == 0:
                ids[-1] = tokenizer.eos_token_id
            reward = replayed_completion_reward([ids])[0]
            if reward not in rewards:  # distinct rewards: no group of completions has a zero reward spread
                bank.append(ids)
                rewards.add(reward)
        self.bank = bank

    def completion_ids(self, prompt: str, k: int) -> list[int]:
        """The completion of the `k`-th occurrence of `prompt` in a call."""
        return list(self.bank[(zlib.crc32(prompt.encode()) + k) % len(self.bank)])

    def __call__(self, prompts: list, trainer=None) -> dict:
        seen: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError(f"{type(self).__name__} replays completions of standard (text) prompts only.")
            k = seen.get(prompt, 0)
            seen[prompt] = k + 1
            prompt_ids.append(self.tokenizer(prompt)["input_ids"])
            completion_ids.append(self.completion_ids(prompt, k))
        logprobs = None
        if self.logprobs:
            logprobs = [[-0.3 - 0.05 * t - (token % 7) / 10 for t, token in enumerate(ids)] for ids in completion_ids]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def _call_text(name: str, arguments: dict) -> str:
    """A call in the paper's `name(key='value', ...)` form."""
    return f"{name}(" + ", ".join(f"{key}='{value}'" for key, value in arguments.items()) + ")"


class ReplayedToolCalls(ReplayedCompletions):
    """A `rollout_func` that replays tool calls: each prompt's completions are variants of its row's gold call that
    fall in different categories of TL-Training's reward, so that the groups of `tool_call_reward` have a reward
    spread (a group whose variants tie, e.g. two `correct` ones, has none, as in real runs).

    `dataset` holds the rendered prompts (text `prompt`, as `hf_plugins.data.render_tool_prompt` makes them), with
    the `gold_call` and `tools` columns. The `k`-th occurrence of a prompt in a call gets the variant
    `(crc32(prompt) + k) % 8` of: the gold call (`correct`), another value (`wrong_value`), no arguments
    (`param_redundant_or_missing`), another declared tool (`wrong_tool`), an extra undeclared argument
    (`param_hallucinated`), an undeclared tool (`tool_hallucination`), prose (`format_error`) and the gold call as a
    `<tool_call>` JSON block (`correct`, or `format_error` when `max_completion_length` cuts it). Every other one ends
    with the EOS token; each is cut to `max_completion_length` tokens.

    Example:
        ```python
        rollout = ReplayedToolCalls(tokenizer, rendered_dataset, max_completion_length=24)
        trainer = GRPOTrainer(model, reward_funcs=tool_call_reward, rollout_func=rollout, train_dataset=rendered_dataset)
        ```
    """

    def __init__(self, tokenizer, dataset, max_completion_length: int, logprobs: bool = False):
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.variants: dict[str, list[list[int]]] = {}
        for row in dataset:
            gold = parse_tool_call(row["gold_call"], strict=False)
            declared = declared_tools(row["tools"])
            other = next(name for name in sorted(declared) if name != gold.name)
            value = next(iter(gold.arguments.values()), "x")

            texts = [
                _call_text(gold.name, gold.arguments),
                _call_text(gold.name, {key: f"{val}x" for key, val in gold.arguments.items()}),
                _call_text(gold.name, {}),
                _call_text(other, dict.fromkeys(sorted(declared[other]), value)),
                _call_text(gold.name, {**gold.arguments, "undeclared_option": "1"}),
                _call_text("search_everything", {"query": value}),
                "I cannot help with that.",
                f"<tool_call>\n{json.dumps({'name': gold.name, 'arguments': gold.arguments})}\n</tool_call>",
            ]
            variants = []
            for i, text in enumerate(texts):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if i % 2 == 0:
                    ids = [*ids, tokenizer.eos_token_id]
                variants.append(ids[:max_completion_length])
            self.variants[row["prompt"]] = variants

    def completion_ids(self, prompt: str, k: int) -> list[int]:
        if prompt not in self.variants:
            raise ValueError("ReplayedToolCalls got a prompt that is not one of its dataset's rendered prompts.")
        variants = self.variants[prompt]
        return list(variants[(zlib.crc32(prompt.encode()) + k) % len(variants)])


def replayed_completion_reward(completion_ids, **kwargs) -> list[float]:
    """A reward of the completion ids alone (their count plus a fraction from their values): distinct across a
    `ReplayedCompletions` bank, so that every group of completions has a reward spread."""
    return [len(ids) + (sum(ids) % 97) / 97 for ids in completion_ids]
