"""The shipped training chat templates: each renders exactly what its original renders, its generation markers cover
exactly what the model writes after the generation prompt, and the trainers swap it in for the exact original.

The templates are rendered with the fixtures' tokenizer, given each family's special tokens; no checkpoint is needed
(the slow tests check the real SmolLM2 tokenizer's template against the stored original).
"""

import copy
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from trl.chat_template_utils import (
    get_training_chat_template,
    is_chat_template_stop_token_trained,
    llama3_chat_template,
    qwen2_5_chat_template,
)

from hf_plugins import FusedSFTConfig, FusedSFTTrainer, TLConfig, TLTrainer, classify_tool_call
from hf_plugins.chat_templates import (
    SHIPPED_TEMPLATES,
    TEMPLATES_DIR,
    find_shipped_template,
    has_generation_markers,
    load_template,
    template_path,
    training_chat_template,
)
from hf_plugins.testing import (
    CPU_TRAINING_ARGS,
    TOOL_CHAT_TEMPLATE,
    build_tokenizer,
    tiny_conversational_dataset,
    tiny_tool_calling_dataset,
)


# Each family's special tokens (added to the fixtures' tokenizer, which already has <|im_start|> and <|im_end|>)
_LLAMA_TOKENS = dict(
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    extra=("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"),
)
FAMILY_TOKENS = {
    "smollm2": dict(bos=None, eos="<|im_end|>", extra=()),
    "smollm3": dict(bos=None, eos="<|im_end|>", extra=()),
    "llama3_1": _LLAMA_TOKENS,
    "llama3_2": _LLAMA_TOKENS,
    "mistral": dict(
        bos="<s>",
        eos="</s>",
        extra=(
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
    ),
}
FAMILIES = sorted(FAMILY_TOKENS)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name, arguments, call_id="abcDEF123"):
    # Mistral requires 9-character call ids; the other templates ignore the id
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def base_tokenizer():
    return build_tokenizer()


def family_tokenizer(base_tokenizer, family, template=None):
    tokenizer = copy.deepcopy(base_tokenizer)
    tokens = FAMILY_TOKENS[family]
    tokenizer.add_tokens([t for t in (tokens["bos"], tokens["eos"], *tokens["extra"]) if t], special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = tokens["bos"], tokens["eos"]
    tokenizer.chat_template = template
    return tokenizer


def original(family):
    return SHIPPED_TEMPLATES[family].original_texts()[0]


# ------------------------------------------------------------------------------------------- conversations


def plain_conversations():
    """Real conversations without tools: the fixtures' datasets (system prompts, two or three exchanges), the demo's
    corpus when installed, and edge cases (whitespace and newlines around content, a lone user turn)."""
    conversations = list(tiny_conversational_dataset(24, seed=3)["messages"])
    try:
        from hf_plugins.demo import load_chatterbot

        conversations += list(load_chatterbot()["train"]["messages"])[:60]
    except ImportError:
        pass
    conversations += [
        [{"role": "user", "content": "Hi!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  Hi!  "},
            {"role": "assistant", "content": "\n\nHello.  "},
            {"role": "user", "content": "Bye."},
            {"role": "assistant", "content": "Bye!\n"},
        ],
    ]
    return conversations


def tool_conversations(family):
    """Tool-calling conversations in the form each original can render (Llama: one call per turn; Mistral: ids)."""
    user = {"role": "user", "content": "What is the weather in Paris?"}
    first = {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"})]}
    response = {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": '{"sky": "blue"}'}
    answer = {"role": "assistant", "content": "The sky is blue in Paris."}
    if family == "smollm3":  # the original drops assistant tool calls, so it cannot render one: tool replies only
        return [[user, {"role": "assistant", "content": "Let me look."}, response, answer]]
    if family == "smollm2":
        return []  # the original renders no tools
    return [
        [user, first, response, answer],
        [
            {"role": "system", "content": "Be brief."},
            user,
            first,
            response,
            answer,
            {"role": "user", "content": "And the time?"},
            {"role": "assistant", "tool_calls": [call("get_time", {"city": "Paris"}, "zyxWVU987")]},
        ],
    ]


def render_kwargs(family):
    """The keyword arguments each family's template reads, in every combination the tests render."""
    if family == "smollm3":
        return [
            {"enable_thinking": True},
            {"enable_thinking": False},
            {"xml_tools": [WEATHER, TIME]},
            {"python_tools": [WEATHER], "enable_thinking": False},
        ]
    if family.startswith("llama3"):
        return [
            {},
            {"date_string": "26 Jul 2024"},
            {"tools": [WEATHER, TIME]},
            {"tools": [WEATHER], "tools_in_user_message": False},
        ]
    if family == "mistral":
        return [{}, {"tools": [WEATHER, TIME]}]
    return [{}]


def system_variants(family, messages):
    """SmolLM3 reads reasoning switches and an override out of the system prompt."""
    if family != "smollm3" or messages[0]["role"] != "system":
        return [messages]
    return [messages] + [
        [{"role": "system", "content": messages[0]["content"] + suffix}, *messages[1:]]
        for suffix in (" /no_think", " /think", " /system_override")
    ]


def prefixes(messages):
    """Every prefix ending on a user or an assistant turn (and the whole conversation)."""
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] in ("user", "assistant")]
    return [messages[:end] for end in sorted(set(ends + [len(messages)]))]


def mistral_alternates(messages):
    """Mistral's template refuses conversations whose user and assistant turns do not alternate."""
    roles = [m["role"] for m in messages if m["role"] in ("user", "assistant") and not m.get("tool_calls")]
    return roles[:1] == ["user"] and all(a != b for a, b in zip(roles, roles[1:]))


# ------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", FAMILIES)
def test_training_template_renders_exactly_like_the_original(base_tokenizer, family):
    tokenizer = family_tokenizer(base_tokenizer, family)
    training = load_template(family)
    checked = 0
    for conversation in plain_conversations() + tool_conversations(family):
        for messages in system_variants(family, conversation):
            for prefix in prefixes(messages):
                if family == "mistral" and not mistral_alternates(prefix):
                    continue
                for kwargs in render_kwargs(family):
                    for add_generation_prompt in (False, True):
                        options = dict(tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
                        expected = tokenizer.apply_chat_template(prefix, chat_template=original(family), **options)
                        assert tokenizer.apply_chat_template(prefix, chat_template=training, **options) == expected, (
                            family,
                            prefix,
                            kwargs,
                            add_generation_prompt,
                        )
                        checked += 1
    assert checked > 100


def test_tool_templates_render_the_tools_the_originals_drop(base_tokenizer):
    """SmolLM2's original renders no tools, SmolLM3's drops assistant tool calls: their training versions write both,
    in the format each model's own prompt describes."""
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": '{"sky": "blue"}'},
        {"role": "assistant", "content": "The sky is blue."},
    ]
    tokenizer = family_tokenizer(base_tokenizer, "smollm2")
    text = tokenizer.apply_chat_template(
        messages, tools=[WEATHER], chat_template=load_template("smollm2"), tokenize=False
    )
    assert "You are an expert in composing functions." in text
    assert '<tools>[{"name": "get_weather", "description": "The weather in a city."' in text
    assert (
        '<|im_start|>assistant\n<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "]</tool_call><|im_end|>\n"
    ) in text
    assert '<|im_start|>user\n<tool_response>\n{"sky": "blue"}\n</tool_response><|im_end|>\n' in text
    assert "named SmolLM" not in text  # the function-calling prompt replaces the default system prompt
    assert_call_is_rewarded(text)

    tokenizer = family_tokenizer(base_tokenizer, "smollm3")
    text = tokenizer.apply_chat_template(
        messages, tools=[WEATHER], chat_template=load_template("smollm3"), tokenize=False, enable_thinking=False
    )
    assert "<tools>\n{'type': 'function'" in text  # `tools` listed as the original lists `xml_tools`
    assert (
        '<|im_start|>assistant\n<think>\n\n</think>\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert_call_is_rewarded(text)


def assert_call_is_rewarded(text):
    """The call as the template writes it is what TL-Training's reward parses as the correct call."""
    completion = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert classify_tool_call(completion, "get_weather(city='Paris')", [WEATHER]) == "correct"


# ------------------------------------------------------------------------------------------- assistant masks


def generated_parts(tokenizer, template, messages, **kwargs):
    """What the model writes for each assistant turn: the rendering with the turn minus the generation prompt before
    it, through the stop token (the whitespace after it is never generated)."""
    parts = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:k], chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
        )
        full = tokenizer.apply_chat_template(messages[: k + 1], chat_template=template, tokenize=False, **kwargs)
        assert full.startswith(prompt), (prompt, full)
        parts.append(full[len(prompt) :].rstrip("\n"))
    return parts


MASKED_CASES = [
    ("smollm2", {}),
    ("smollm3", {"enable_thinking": False}),
    ("smollm3", {"enable_thinking": True}),
    ("llama3_1", {}),
    ("llama3_2", {}),
    ("mistral", {}),
    ("chatml_tools", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), MASKED_CASES)
def test_generation_markers_cover_exactly_what_the_assistant_writes(base_tokenizer, name, kwargs):
    family = name if name in FAMILY_TOKENS else "smollm2"
    tokenizer = family_tokenizer(base_tokenizer, family)
    template = load_template(name)
    conversations = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is AI?"},
            {"role": "assistant", "content": "Machines that think."},
            {"role": "user", "content": "Really?"},
            {"role": "assistant", "content": "Sort of."},
        ],
    ]
    if name != "smollm3" or kwargs.get("enable_thinking") is False:
        conversations += list(tool_conversations("llama3_1"))  # a call, its response, an answer, a call
    for messages in conversations:
        if name == "mistral":  # Mistral writes the system prompt into the last user turn: no prompt is a prefix
            messages = [m for m in messages if m["role"] != "system"]
        out = tokenizer.apply_chat_template(
            messages, chat_template=template, return_dict=True, return_assistant_tokens_mask=True, **kwargs
        )
        masked = tokenizer.decode([t for t, keep in zip(out["input_ids"], out["assistant_masks"]) if keep])
        assert masked == "".join(generated_parts(tokenizer, template, messages, **kwargs)), messages
    assert is_chat_template_stop_token_trained(tokenizer, chat_template=template)


def test_smollm3_original_trains_on_its_prompt_cue(base_tokenizer):
    """Why SmolLM3 gets a training template although its original has markers: they also cover the
    `<|im_start|>assistant` cue and the empty think block, which the generation prompt already holds."""
    tokenizer = family_tokenizer(base_tokenizer, "smollm3")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert has_generation_markers(original("smollm3"))
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=original("smollm3"),
        return_dict=True,
        return_assistant_tokens_mask=True,
        enable_thinking=False,
    )
    masked = tokenizer.decode([t for t, keep in zip(out["input_ids"], out["assistant_masks"]) if keep])
    assert masked == "<|im_start|>assistant\n<think>\n\n</think>\nHello.<|im_end|>\n"


# ------------------------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("family", FAMILIES)
def test_each_original_is_recognised_exactly(base_tokenizer, family):
    text = original(family)
    assert find_shipped_template(text).name == family
    assert find_shipped_template(text.removesuffix("\n") + "\n").name == family  # Jinja ignores one final newline
    assert find_shipped_template(text + " ") is None  # any other byte: not recognised
    tokenizer = family_tokenizer(base_tokenizer, family, template=text)
    assert training_chat_template(tokenizer) == load_template(family)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "smollm3"])
def test_trl_does_not_patch_the_shipped_families(base_tokenizer, family):
    """The families shipped here are those TRL 1.16 refuses ("patching is not supported for this template")."""
    tokenizer = family_tokenizer(base_tokenizer, family, template=original(family))
    with pytest.raises(ValueError, match="patching is not supported"):
        get_training_chat_template(tokenizer)


def test_families_trl_patches_are_left_to_trl(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "smollm2")
    for trl_original in (qwen2_5_chat_template, llama3_chat_template):
        tokenizer.chat_template = trl_original
        assert get_training_chat_template(tokenizer) is not None
        assert training_chat_template(tokenizer) is None
        assert tokenizer.chat_template == trl_original
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE  # markers already
    assert training_chat_template(tokenizer) is None


def test_unknown_template_error_says_what_to_do(base_tokenizer):
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tokenizer = family_tokenizer(base_tokenizer, "smollm2", template=plain)
    with pytest.raises(ValueError) as error:
        training_chat_template(tokenizer)
    message = str(error.value)
    assert "\n" not in message
    assert "--chat_template_path" in message and "assistant_only_loss=False" in message
    assert all(name in message for name in SHIPPED_TEMPLATES) and str(TEMPLATES_DIR) in message


def test_templates_by_name_and_the_fixture_alias():
    assert template_path("smollm2") == template_path("smollm2_training") == template_path("smollm2_training.jinja")
    assert template_path("smollm2") == TEMPLATES_DIR / "smollm2_training.jinja"
    assert TOOL_CHAT_TEMPLATE == load_template("chatml_tools")
    for name in SHIPPED_TEMPLATES:
        assert has_generation_markers(load_template(name))
    with pytest.raises(ValueError, match="shipped ones are smollm2"):
        template_path("qwen9")
    with pytest.raises(ValueError, match="shipped ones are smollm2"):
        template_path("some-org/smollm2")  # a Hub repo to copy a template from is not a shipped name


# ------------------------------------------------------------------------------------------- in the trainers


def sft_args(tmp_path, **kwargs):
    return FusedSFTConfig(
        str(tmp_path / "out"), max_steps=1, assistant_only_loss=True, max_length=256, **{**CPU_TRAINING_ARGS, **kwargs}
    )


@pytest.fixture
def smollm2_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = original("smollm2")
    return tokenizer


def supervised_text(trainer, tokenizer, index=0):
    row = trainer.train_dataset[index]
    mask = row.get("assistant_masks") or [int(label != -100) for label in row["labels"]]
    return tokenizer.decode([t for t, keep in zip(row["input_ids"], mask) if keep])


def test_trainer_swaps_in_the_training_template(tmp_path, tiny_model_dir, smollm2_tokenizer):
    dataset = tiny_conversational_dataset(4)
    trainer = FusedSFTTrainer(
        model=tiny_model_dir, args=sft_args(tmp_path), train_dataset=dataset, processing_class=smollm2_tokenizer
    )
    assert trainer.processing_class.chat_template == load_template("smollm2")
    expected = [m["content"] + "<|im_end|>" for m in dataset[0]["messages"] if m["role"] == "assistant"]
    assert supervised_text(trainer, smollm2_tokenizer) == "".join(expected)
    trainer.train()


def test_trainer_loads_the_tokenizer_and_swaps_its_template(tmp_path, tiny_model_dir, smollm2_tokenizer):
    """With no processing class, the tokenizer saved with the model is the one judged (the CLI's path)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    trainer = FusedSFTTrainer(
        model=str(model_dir), args=sft_args(tmp_path), train_dataset=tiny_conversational_dataset(4)
    )
    assert trainer.processing_class.chat_template == load_template("smollm2")


def test_unknown_template_fails_before_the_model_loads(tmp_path, tiny_model_dir):
    """The folder holds a tokenizer but no model: the template error comes first, so the model was never loaded."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "tokenizer-only")
    with pytest.raises(ValueError, match=r"no `\{% generation %\}` markers.*assistant_only_loss=False"):
        FusedSFTTrainer(
            model=str(tmp_path / "tokenizer-only"),
            args=sft_args(tmp_path),
            train_dataset=tiny_conversational_dataset(4),
        )


def test_chat_template_path_takes_a_shipped_name(tmp_path, tiny_model_dir, smollm2_tokenizer):
    args = sft_args(tmp_path, chat_template_path="smollm2")
    smollm2_tokenizer.chat_template = None
    trainer = FusedSFTTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=tiny_conversational_dataset(4),
        processing_class=smollm2_tokenizer,
    )
    assert trainer.processing_class.chat_template == load_template("smollm2")
    assert args.chat_template_path == "smollm2"  # the config keeps what the user wrote


def test_chat_template_path_file(tmp_path, tiny_model_dir, smollm2_tokenizer):
    known = tmp_path / "smollm2_original.jinja"
    known.write_text(original("smollm2"))
    trainer = FusedSFTTrainer(
        model=tiny_model_dir,
        args=sft_args(tmp_path, chat_template_path=str(known)),
        train_dataset=tiny_conversational_dataset(4),
        processing_class=smollm2_tokenizer,
    )
    assert trainer.processing_class.chat_template == load_template("smollm2")

    unknown = tmp_path / "plain.jinja"
    unknown.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match=f"The template in `chat_template_path` \\({unknown}\\) has no"):
        FusedSFTTrainer(
            model=tiny_model_dir,
            args=sft_args(tmp_path, chat_template_path=str(unknown)),
            train_dataset=tiny_conversational_dataset(4),
            processing_class=smollm2_tokenizer,
        )


def test_tl_trainer_on_the_smollm2_template_weighs_the_tool_calls(tmp_path, tiny_model_dir, smollm2_tokenizer):
    """TL-Training needs the tools rendered: with SmolLM2's original template it gets the training version, which
    writes them, and finds the called tools' key tokens."""
    dataset = tiny_tool_calling_dataset(4)
    args = TLConfig(str(tmp_path / "out"), max_steps=1, max_length=2048, **CPU_TRAINING_ARGS)
    trainer = TLTrainer(model=tiny_model_dir, args=args, train_dataset=dataset, processing_class=smollm2_tokenizer)
    row = trainer.train_dataset[0]
    text = smollm2_tokenizer.decode(row["input_ids"])
    assert "<tools>[" in text and '<tool_call>[\n{"name": "' in text
    assert max(row["token_weights"]) > 1  # key tokens found in the rendered calls
    trainer.train()


def test_the_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "chat_templates.md").read_text()
    code = text.split("## In Python")[1].split("```python")[1].split("```")[0]
    exec(compile(code, "chat_templates.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "Hello.<|im_end|>"
