"""The `hf-plugins` command and configs as Hub artifacts, on the tiny offline model."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from testing_utils import CLI_CPU_FLAGS, logged, logged_in

import hf_plugins
from hf_plugins.cli import main
from hf_plugins.testing import (
    TOOL_CHAT_TEMPLATE,
    tiny_conversational_dataset,
    tiny_prompt_completion_dataset,
    tiny_tool_calling_dataset,
    tiny_truthrl_dataset,
)
from hf_plugins.trainers import TRAINERS


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"
#: What every CLI run here overrides: a CPU, two steps, small batches, no saving of checkpoints.
CPU_FLAGS = [
    *CLI_CPU_FLAGS,
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "1",
    "--max_length",
    "128",
    "--logging_steps",
    "1",
]
#: The same for `hf-plugins grpo` (prompts completed by generation instead of `--max_length` sequences), with a reward
#: by import path, as `trl grpo` takes one
GRPO_FLAGS = [
    *CPU_FLAGS[: CPU_FLAGS.index("--max_length")],
    *CPU_FLAGS[CPU_FLAGS.index("--max_length") + 2 :],
    "--max_completion_length",
    "8",
    "--num_generations",
    "2",
    "--reward_funcs",
    "hf_plugins.testing.replayed_completion_reward",
]


#: `hf-plugins truthrl` builds its reward (TruthRL's) itself: no `--reward_funcs`, completions long enough for a box
TRUTHRL_FLAGS = [*GRPO_FLAGS[: GRPO_FLAGS.index("--max_completion_length")], "--max_completion_length", "16"]
TRUTHRL_FLAGS += ["--num_generations", "2"]

#: The commands whose trainer brings its own reward: no reward function needed
SELF_REWARDING = ("srppo", "tl-grpo")


def cpu_flags(method):
    if method in SELF_REWARDING:
        return [flag for flag in GRPO_FLAGS if flag not in GRPO_FLAGS[-2:]]
    return {"grpo": GRPO_FLAGS, "truthrl": TRUTHRL_FLAGS}.get(method, CPU_FLAGS)


def data_of(method, data_dirs):
    """The dataset of `method`'s CLI runs: GRPO-side methods take prompts, TL-Training's stages tool calls."""
    if method in ("grpo", "srppo"):
        return data_dirs["grpo"]
    if method in ("tl", "tl-grpo"):
        return data_dirs["tools"]
    return data_dirs[method] if method in ("poft", "truthrl") else data_dirs["chat"]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    chat = root / "chat"
    tiny_conversational_dataset(12).save_to_disk(str(chat))
    tools = root / "tools"
    tiny_tool_calling_dataset(8).save_to_disk(str(tools))
    scored = root / "scored"  # PoFT's `ref_score` column, as score_with_aligned_models adds it
    tiny_conversational_dataset(12).add_column("ref_score", [-3.0 + 0.1 * i for i in range(12)]).save_to_disk(
        str(scored)
    )
    prompts = root / "prompts"  # GRPO's prompts, which generation completes
    tiny_prompt_completion_dataset(12).select_columns(["prompt"]).save_to_disk(str(prompts))
    questions = root / "questions"  # TruthRL's prompts with their gold `answers`
    tiny_truthrl_dataset(12).save_to_disk(str(questions))
    return {
        "chat": str(chat),
        "tools": str(tools),
        "poft": str(scored),
        "grpo": str(prompts),
        "truthrl": str(questions),
    }


@pytest.fixture(scope="module")
def tool_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with the tool-calling chat template (TL-Training renders `tools`)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-tool-model")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


def paths(model, dataset, output_dir) -> list:
    """The three paths of a run, as command-line arguments."""
    return ["--model_name_or_path", model, "--dataset_name", dataset, "--output_dir", output_dir]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------------- commands


def test_help_lists_every_method(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name, trainer in TRAINERS.items():
        assert f"  {name} " in out
        assert hasattr(hf_plugins, trainer.config_class.__name__) and hasattr(hf_plugins, trainer.__name__)
    assert {"sft", "asft", "otr", "tl", "poft", "roste"} <= set(TRAINERS)


def test_method_help_lists_its_fields(capsys):
    code, out, _ = run_cli(capsys, "asft", "--help")
    assert code == 0 and "--kl_coef" in out and "--model_name_or_path" in out and "--dataset_name" in out


@pytest.mark.parametrize("method", sorted(TRAINERS))
def test_example_config_runs_two_steps(
    capsys, tmp_path, tiny_model_dir, tool_model_dir, tiny_sft_adapter_dir, data_dirs, method
):
    config = EXAMPLES / f"{method}.yaml"
    assert config.is_file(), f"examples/configs/{method}.yaml is missing"
    model = tool_model_dir if method in ("tl", "tl-grpo") else tiny_model_dir
    data = data_of(method, data_dirs)
    out = tmp_path / "out"
    extra = {
        "roste": ["--rotation_search_samples", "4", "--rotation_search_max_length", "64"],
        "srppo": ["--sft_adapter_path", tiny_sft_adapter_dir],  # the YAML's adapter, made for the tiny model
    }.get(method, [])
    code, _, err = run_cli(
        capsys,
        method,
        "--config",
        config,
        *paths(model, data, out),
        *cpu_flags(method),
        *extra,
    )
    assert code == 0, err[-2000:]
    assert len(logged_in(out)) == 2 and all(loss == loss for loss in logged_in(out))
    assert (out / "model.safetensors").exists() or any(out.glob("*.safetensors"))
    if method == "srppo":
        assert len(logged_in(out, "self_reward/per_token")) == 2
    if method == "tl-grpo":  # the tool-call reward of every completion, by category
        assert len(logged_in(out, "rewards/tool_call_reward/mean")) == 2
        assert len(logged_in(out, "tool_call/format_error")) == 2
    card = (out / "README.md").read_text()
    trainer_class = TRAINERS[method]
    assert trainer_class._name in card
    if trainer_class._paper.get("id"):
        assert trainer_class._paper["id"] in card  # the model card cites the method's paper
    # named after the run; the local model and data named as given, with no Hub link
    assert "# Model Card for out\n" in card and "None" not in card
    assert f"fine-tuned version of `{model}`, trained on `{data}`." in card
    assert "huggingface.co/datasets" not in card and f"huggingface.co/{model}" not in card


def test_model_card_links_hub_ids_and_names_local_paths(tiny_model_dir, tmp_path):
    from huggingface_hub import ModelCard

    trainer = hf_plugins.FusedSFTTrainer(
        tiny_model_dir,
        args=hf_plugins.FusedSFTConfig(
            output_dir=str(tmp_path / "my-run"), max_steps=1, bf16=False, use_cpu=True, report_to="none"
        ),
        train_dataset=tiny_conversational_dataset(4),
    )
    trainer.model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trainer.create_model_card(dataset_name=["trl-lib/Capybara", str(tmp_path / "local.jsonl")])
    card = ModelCard.load(tmp_path / "my-run" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.datasets == ["trl-lib/Capybara"]
    assert card.data.model_name == "my-run" and "hf-plugins" in card.data.tags
    smollm2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert f"[{smollm2}](https://huggingface.co/{smollm2})" in card.text
    assert "[trl-lib/Capybara](https://huggingface.co/datasets/trl-lib/Capybara)" in card.text
    assert f"`{tmp_path / 'local.jsonl'}`" in card.text and "datasets//" not in card.text
    # a model built in code has no name
    trainer.model.config._name_or_path = ""
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "my-run" / "README.md")
    assert card.data.base_model is None and "a model built in code" in card.text and "None" not in card.text


def test_trl_sft_yaml_runs_unchanged_under_sft_and_asft(capsys, tmp_path, tiny_model_dir, data_dirs):
    """A YAML with only `trl sft` keys (model, dataset, SFTConfig fields) works for our commands."""
    trl_yaml = tmp_path / "trl_sft.yaml"
    trl_yaml.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": tiny_model_dir,
                "dataset_name": data_dirs["chat"],
                "learning_rate": 5.0e-3,
                "max_length": 128,
                "packing": False,
                "assistant_only_loss": True,
                "per_device_train_batch_size": 2,
                "max_steps": 2,
                "bf16": False,
                "use_cpu": True,
                "gradient_checkpointing": False,
                "report_to": "none",
                "save_strategy": "no",
                "logging_steps": 1,
            }
        )
    )
    for method in ("sft", "asft"):
        out = tmp_path / method
        code, _, err = run_cli(capsys, method, "--config", trl_yaml, "--output_dir", out)
        assert code == 0, err[-2000:]
        assert len(logged_in(out)) == 2


def test_sft_command_matches_the_trainer_in_python(capsys, tmp_path, tiny_model_dir, data_dirs):
    from datasets import load_from_disk

    out = tmp_path / "cli"
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths(tiny_model_dir, data_dirs["chat"], out),
        "--learning_rate",
        "5e-3",
        *CPU_FLAGS,
    )
    assert code == 0, err
    config = hf_plugins.FusedSFTConfig(
        output_dir=str(tmp_path / "py"),
        learning_rate=5e-3,
        max_steps=2,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        max_length=128,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    trainer = hf_plugins.FusedSFTTrainer(tiny_model_dir, args=config, train_dataset=load_from_disk(data_dirs["chat"]))
    trainer.train()
    assert logged_in(out) == pytest.approx(logged(trainer), abs=1e-6)


def test_grpo_command_reads_trl_grpo_yaml_and_matches_the_trainer_in_python(
    capsys, tmp_path, tiny_model_dir, data_dirs, monkeypatch
):
    """A YAML of `trl grpo` (its script's `reward_funcs`, a reward by dotted path from the working directory, as
    TRL's script imports it) runs under `hf-plugins grpo`, with the losses of FusedGRPOTrainer built in Python; TRL's
    own `grpo` parser reads the same file, and the shipped example, without a leftover key."""
    from datasets import load_from_disk
    from trl.scripts.grpo import make_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(
        "def length_reward(completion_ids, **kwargs):\n"
        "    return [len(ids) + ids[0] / 1000 for ids in completion_ids]\n"
    )
    settings = {
        "learning_rate": 5.0e-3,
        "max_steps": 2,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 8,
        "beta": 0.04,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
    }
    trl_yaml = tmp_path / "trl_grpo.yaml"
    trl_yaml.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": tiny_model_dir,
                "dataset_name": data_dirs["grpo"],
                "reward_funcs": ["my_rewards.length_reward"],
                "output_dir": str(tmp_path / "cli"),
                **settings,
            }
        )
    )
    for config in (trl_yaml, EXAMPLES / "grpo.yaml"):
        # (the example's `bf16: true` needs a GPU to build the config)
        *_, remaining = make_parser().parse_args_and_config(
            args=["--config", str(config), "--bf16", "False", "--use_cpu", "True"], return_remaining_strings=True
        )
        assert remaining == [], config
    code, _, err = run_cli(capsys, "grpo", "--config", trl_yaml)
    assert code == 0, err[-2000:]

    import my_rewards

    config = hf_plugins.FusedGRPOConfig(output_dir=str(tmp_path / "py"), **settings)
    trainer = hf_plugins.FusedGRPOTrainer(
        tiny_model_dir,
        reward_funcs=[my_rewards.length_reward],
        args=config,
        train_dataset=load_from_disk(data_dirs["grpo"]),
    )
    trainer.train()
    expected = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(expected) == 2 and logged_in(tmp_path / "cli") == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------------- bad input


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("hf-plugins")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_method(capsys):
    _one_line_error(*run_cli(capsys, "dpo", "--config", "x.yaml")[::2], "unknown command 'dpo'", "asft")


def test_missing_dataset(capsys, tiny_model_dir, tmp_path):
    code, _, err = run_cli(capsys, "sft", "--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path, *CPU_FLAGS)
    _one_line_error(code, err, "no dataset", "--dataset_name")
    # the config's own checks come first, as one line too
    code, _, err = run_cli(capsys, "sft", "--model_name_or_path", tiny_model_dir, "--bf16", "True")
    _one_line_error(code, err, "bf16")


def test_field_of_another_method(capsys, tiny_model_dir, data_dirs, tmp_path):
    code, _, err = run_cli(
        capsys,
        "otr",
        *paths(tiny_model_dir, data_dirs["chat"], tmp_path),
        "--kl_coef",
        "0.1",
        *CPU_FLAGS,
    )
    _one_line_error(code, err, "--kl_coef")


def test_unknown_yaml_key_and_unsafe_tag(capsys, tmp_path, tiny_model_dir, data_dirs):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data_dirs['chat']}\nnum_samples: 4\nuse_cpu: true\n"
    )
    _one_line_error(*run_cli(capsys, "asft", "--config", unknown, "--output_dir", tmp_path)[::2], "num_samples")
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("learning_rate: !!python/object/apply:os.system ['echo pwned']\n")
    _one_line_error(*run_cli(capsys, "sft", "--config", unsafe)[::2], "unsafe.yaml", "tag")


def test_missing_config_file(capsys, tmp_path):
    _one_line_error(*run_cli(capsys, "sft", "--config", tmp_path / "nope.yaml")[::2], "nope.yaml")


# One test per bad input of the first hour of a user. The checks run before any model is loaded: the tests point
# `--model_name_or_path` at a folder whose config names no known model type, so that loading it (or its tokenizer)
# would end with a different error than the one each test expects.


@pytest.fixture(scope="module")
def unloadable_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unloadable-model")
    (folder / "config.json").write_text(json.dumps({"model_type": "not-a-model-type-loading-this-would-fail"}))
    return str(folder)


def test_the_unloadable_model_fails_loudly_once_the_input_is_fine(capsys, unloadable_model_dir, data_dirs, tmp_path):
    """The premise of the tests below: with good input, the run reaches the model and fails there."""
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths(unloadable_model_dir, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
    )
    assert code != 0 and "not-a-model-type" in err


@pytest.fixture(scope="module")
def bad_data_dirs(tmp_path_factory):
    from datasets import Dataset

    root = tmp_path_factory.mktemp("bad-data")
    chat = tiny_conversational_dataset(12)
    chat.rename_column("messages", "conversation").save_to_disk(str(root / "conversation"))
    no_assistant = [[m for m in row if m["role"] != "assistant"] for row in chat["messages"]]
    Dataset.from_dict({"messages": no_assistant}).save_to_disk(str(root / "no-assistant"))
    # one conversation without the assistant's turn among complete ones
    some = [no_assistant[0], *chat["messages"][1:]]
    Dataset.from_dict({"messages": some}).save_to_disk(str(root / "one-without-assistant"))
    Dataset.from_dict({"text": ["plain text", "more text"]}).save_to_disk(str(root / "text"))
    return {name: str(root / name) for name in ("conversation", "no-assistant", "one-without-assistant", "text")}


def test_dataset_column_conversation_instead_of_messages(capsys, unloadable_model_dir, bad_data_dirs, tmp_path):
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths(unloadable_model_dir, bad_data_dirs["conversation"], tmp_path),
        *CPU_FLAGS,
    )
    _one_line_error(code, err, "`conversation`", "`messages`", "rename_column('conversation', 'messages')")


@pytest.mark.parametrize(
    "method,data,needles",
    [
        ("poft", "chat", ["`ref_score`", "score_with_aligned_models"]),
        ("tl", "text", ["`text`", "`messages` column of conversations"]),
    ],
)
def test_dataset_without_what_the_method_reads(
    capsys, unloadable_model_dir, data_dirs, bad_data_dirs, tmp_path, method, data, needles
):
    code, _, err = run_cli(
        capsys,
        method,
        "--model_name_or_path",
        unloadable_model_dir,
        "--output_dir",
        tmp_path,
        *CPU_FLAGS,
        "--dataset_name",
        {**data_dirs, **bad_data_dirs}[data],
    )
    _one_line_error(code, err, *needles)


def test_model_path_that_does_not_exist(capsys, data_dirs, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths(missing, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
    )
    _one_line_error(code, err, "--model_name_or_path", str(missing), "no such folder")
    # a Hub id is looked up in the local cache when the Hub is offline (the tests run with HF_HUB_OFFLINE=1)
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths("some-org/not-in-the-cache", data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
    )
    _one_line_error(code, err, "some-org/not-in-the-cache", "offline", "local Hub cache")
    # a folder that holds no model
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths(tmp_path, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
    )
    _one_line_error(code, err, "config.json")


def test_resume_from_a_checkpoint_that_does_not_exist(capsys, unloadable_model_dir, data_dirs, tmp_path):
    args = [
        "sft",
        *paths(unloadable_model_dir, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
    ]
    code, _, err = run_cli(capsys, *args, "--resume_from_checkpoint", tmp_path / "checkpoint-9")
    _one_line_error(code, err, "--resume_from_checkpoint", "checkpoint-9", "does not exist")
    # the output folder instead of one of its checkpoints
    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    code, _, err = run_cli(capsys, *args, "--resume_from_checkpoint", tmp_path / "run")
    _one_line_error(code, err, "not a checkpoint", str(tmp_path / "run" / "checkpoint-4"))


def test_assistant_only_loss_on_conversations_without_an_assistant_turn(
    capsys, unloadable_model_dir, bad_data_dirs, tmp_path
):
    args = [
        "sft",
        "--model_name_or_path",
        unloadable_model_dir,
        "--output_dir",
        tmp_path,
        *CPU_FLAGS,
        "--assistant_only_loss",
        "True",
    ]
    code, _, err = run_cli(capsys, *args, "--dataset_name", bad_data_dirs["no-assistant"])
    _one_line_error(
        code, err, "assistant_only_loss", "12 of the 12 conversations", "role 'assistant'", "roles seen: system, user"
    )
    # one row is enough for TRL to fail: it is named
    code, _, err = run_cli(capsys, *args, "--dataset_name", bad_data_dirs["one-without-assistant"])
    _one_line_error(code, err, "1 of the 12 conversations", "first: row 0")


def test_no_assistant_turn_with_the_default_settings(capsys, unloadable_model_dir, bad_data_dirs, tmp_path):
    args = [
        "sft",
        *paths(unloadable_model_dir, bad_data_dirs["no-assistant"], tmp_path),
        *CPU_FLAGS,
    ]
    code, _, err = run_cli(capsys, *args)
    _one_line_error(code, err, "none of the 12 conversations", "role 'assistant'", "--assistant_only_loss False")
    # asked for explicitly, every token is trained: the run goes on (to the model, which fails to load here)
    code, _, err = run_cli(capsys, *args, "--assistant_only_loss", "False")
    assert code != 0 and "not-a-model-type" in err


def test_typo_gets_did_you_mean(capsys, unloadable_model_dir, data_dirs, tmp_path):
    args = [
        "sft",
        *paths(unloadable_model_dir, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
    ]
    code, _, err = run_cli(capsys, *args, "--learnig_rate", "1e-3")
    _one_line_error(code, err, "`--learnig_rate`", "did you mean `--learning_rate`?")
    config = tmp_path / "typo.yaml"
    config.write_text("learnig_rate: 1.0e-3\n")
    code, _, err = run_cli(capsys, *args, "--config", config)
    _one_line_error(code, err, "`learnig_rate` (a key of the YAML config)", "did you mean `learning_rate`?")


def test_uds_keep_is_a_count_not_a_fraction(capsys, unloadable_model_dir, data_dirs, tmp_path):
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths(unloadable_model_dir, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
        "--per_device_train_batch_size",
        "4",
        "--uds_keep",
        "0.5",
    )
    _one_line_error(code, err, "--uds_keep 0.5", "is a count", "not a fraction", "--uds_keep 2")


@pytest.mark.parametrize(
    "flags, needles",
    [(["--lfu_alpha", "0"], ["`lfu_alpha=0.0`", "> 0"]), (["--lfu_lambda", "-1"], ["`lfu_lambda=-1.0`", ">= 0"])],
)
def test_lfu_bad_settings_print_one_line(capsys, unloadable_model_dir, data_dirs, tmp_path, flags, needles):
    code, _, err = run_cli(
        capsys, "lfu", *paths(unloadable_model_dir, data_dirs["chat"], tmp_path), *CPU_FLAGS, *flags
    )
    _one_line_error(code, err, *needles)


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_roste_with_use_peft_names_the_cli_flag(capsys, unloadable_model_dir, data_dirs, tmp_path, how):
    args = [
        "roste",
        *paths(unloadable_model_dir, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
    ]
    if how == "flag":
        args += ["--use_peft", "True"]
    else:
        config = tmp_path / "peft.yaml"
        config.write_text("use_peft: true\nlora_r: 8\n")
        args += ["--config", config]
    code, _, err = run_cli(capsys, *args)
    _one_line_error(code, err, "--use_peft", "full", "drop --use_peft")
    assert "peft_config" not in err


def test_bad_input_prints_one_line_in_a_fresh_process(tmp_path, data_dirs):
    """What a user sees in a terminal: the error line only (no warnings, no log lines from the imports)."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_plugins.cli",
            "sft",
            *paths(str(tmp_path / "nope"), data_dirs["chat"], str(tmp_path)),
            *CPU_FLAGS,
            "--learnig_rate",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "hf-plugins sft: error: `--learnig_rate` is not a field of `hf-plugins sft`: did you mean `--learning_rate`?"
    ], result.stderr


# ----------------------------------------------------------------------------------------- configs as artifacts


def _configs():
    return [trainer.config_class for trainer in TRAINERS.values()]


def _non_defaults(config_class):
    """A few non-default values per config, including the method's own fields and a `*_token` field."""
    common = dict(
        learning_rate=3e-4,
        eos_token="<|im_end|>",
        lr_scheduler_type="cosine",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=7,
        max_length=333,
    )
    own = {
        "FusedSFTConfig": dict(loss_type="dft", loss_backend="chunked", loss_chunk_size=48),
        "ASFTConfig": dict(kl_coef=0.11, ref_model="some/reference"),
        "OTRConfig": dict(num_samples=None, temperature=0.9, negative_reward=-0.3),
        "TLConfig": dict(max_weight=4.0, weight_normalization="token", mae=False),
        "PoFTConfig": dict(beta=0.5, gamma=0.1, poft_target_scope="full"),
        "MFTConfig": dict(
            mask_rate=0.2,
            mask_rate_schedule="constant",
            mask_rate_warmup_ratio=0.5,
            replace_rate=0.0,
            mask_token="pad",
        ),
        "LfUConfig": dict(lfu_alpha=0.05, lfu_lambda=2.0, lfu_layers=[0, 2], lfu_seed=11),
        "RoSTEConfig": dict(w_bits=3, a_bits=8, kv_sym=False, rotations="all", rotation_search_samples=16),
        "SRPPOConfig": dict(
            sft_adapter_path="some/adapter",
            sft_adapter_name="sft_copy",
            base_model="some/base",
            self_reward_normalization="mean",
            loss_type="cispo",
            epsilon_high=5.0,
            num_generations=4,
        ),
        "TLGRPOConfig": dict(gold_call_column="call", strict_tool_parsing=False, loss_type="grpo", beta=0.04),
        "FusedGRPOConfig": dict(
            loss_type="cispo",
            epsilon_high=5.0,
            beta=0.04,
            loss_backend="chunked",
            loss_chunk_size=48,
            num_generations=4,
            steps_per_generation=2,
        ),
        "TruthRLConfig": dict(
            truthrl_scheme="binary_ook",
            truthrl_answers_column="gold",
            truthrl_ook_column="unknowable",
            truthrl_abstain_phrases=["no idea", "i dont know"],
            truthrl_balanced_braces=True,
            truthrl_judge="my_judges.exact",
            loss_backend="chunked",
            num_generations=4,
        ),
    }
    if issubclass(config_class, hf_plugins.FusedGRPOConfig):  # no `max_length` (generated), no `eos_token`
        common.pop("max_length")
        common.pop("eos_token")
    assert config_class.__name__ in own, f"add non-default values of {config_class.__name__}'s own fields to `own`"
    return {**common, **own[config_class.__name__]}


def _same(a, b):
    import dataclasses

    from hf_plugins.trainers.hub_config import _plain

    for field in dataclasses.fields(a):
        if field.init and field.name not in ("hub_token",):
            assert _plain(getattr(a, field.name)) == _plain(getattr(b, field.name)), field.name


@pytest.mark.parametrize("config_class", _configs(), ids=lambda c: c.__name__)
def test_config_round_trip_is_lossless(tmp_path, config_class):
    config = config_class(output_dir=str(tmp_path / "run"), hub_token="secret-token", **_non_defaults(config_class))
    folder = config.save_pretrained(tmp_path / "saved")
    text = (folder / "hf_plugins_config.yaml").read_text()
    assert "secret-token" not in text and "hub_token" not in text
    assert (folder / "README.md").exists()
    loaded = config_class.from_pretrained(folder)
    assert type(loaded) is config_class
    _same(config, loaded)
    assert getattr(loaded, "eos_token", "<|im_end|>") == "<|im_end|>"
    _same(config, config_class.from_pretrained(folder / "hf_plugins_config.yaml"))


@pytest.mark.parametrize(
    "config_class", [hf_plugins.FusedSFTConfig, hf_plugins.with_uds(hf_plugins.ASFTConfig)], ids=lambda c: c.__name__
)
def test_saved_config_holds_only_the_fields_that_were_changed(tmp_path, config_class):
    """Not what `__post_init__` derived from the defaults (`report_to: []`, `debug: []`, `accelerator_config`, the
    tqdm and pin-memory settings), which would be pinned in the file; a change made after construction is kept."""
    config = config_class(output_dir=str(tmp_path / "run"), learning_rate=3e-4, use_cpu=True, bf16=False)
    config.seed = 3

    def saved():
        return yaml.safe_load((config.save_pretrained(tmp_path / "saved") / "hf_plugins_config.yaml").read_text())

    assert saved() == {
        "output_dir": str(tmp_path / "run"),
        "learning_rate": 3e-4,
        "use_cpu": True,
        "bf16": False,
        "seed": 3,
    }
    config.report_to = ["tensorboard"]
    assert saved()["report_to"] == ["tensorboard"]


def test_config_from_a_hub_cache_offline(tmp_path):
    """A repo id resolves from the local Hub cache layout when offline (HF_HUB_OFFLINE=1 in tests)."""
    config = hf_plugins.ASFTConfig(output_dir=str(tmp_path / "run"), kl_coef=0.07, use_cpu=True, bf16=False)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--asft-config"
    config.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    loaded = hf_plugins.ASFTConfig.from_pretrained("org/asft-config", cache_dir=cache)
    assert loaded.kl_coef == 0.07
    with pytest.raises(ValueError, match="org/missing.*local cache"):
        hf_plugins.ASFTConfig.from_pretrained("org/missing", cache_dir=cache)


def test_config_loading_refuses_unknown_fields_and_unsafe_yaml(tmp_path):
    hf_plugins.OTRConfig(output_dir=str(tmp_path / "r"), num_samples=3, use_cpu=True).save_pretrained(tmp_path / "otr")
    with pytest.raises(ValueError, match="ASFTConfig does not know: num_samples"):
        hf_plugins.ASFTConfig.from_pretrained(tmp_path / "otr")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "hf_plugins_config.yaml").write_text("seed: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ValueError, match="YAML tag that safe loading refuses"):
        hf_plugins.ASFTConfig.from_pretrained(bad)


def test_saved_config_is_a_cli_config(capsys, tmp_path, tiny_model_dir, data_dirs):
    config = hf_plugins.ASFTConfig(
        output_dir=str(tmp_path / "out"),
        kl_coef=0.2,
        max_steps=2,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        max_length=128,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    folder = config.save_pretrained(tmp_path / "asft-config")
    code, _, err = run_cli(
        capsys, "asft", "--config", folder, "--model_name_or_path", tiny_model_dir, "--dataset_name", data_dirs["chat"]
    )
    assert code == 0, err[-2000:]
    assert len(logged_in(tmp_path / "out")) == 2


def test_accelerate_examples_cover_every_engine_and_method():
    folder = ROOT / "examples" / "accelerate"
    engines = {
        "single_gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "fsdp2": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
    }
    for name, kind in engines.items():
        config = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert config["distributed_type"] == kind, name
    assert yaml.safe_load((folder / "fsdp2.yaml").read_text())["fsdp_config"]["fsdp_version"] == 2
    assert yaml.safe_load((folder / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3
    for method in TRAINERS:
        script = (folder / f"launch_{method}.sh").read_text()
        assert f"examples/train.py {method} --config" in script and "accelerate launch --config_file" in script


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_uds_is_an_option_of_any_command(capsys, tmp_path, tiny_model_dir, data_dirs, how):
    out = tmp_path / "out"
    args = [
        "asft",
        *paths(tiny_model_dir, data_dirs["chat"], out),
        *CPU_FLAGS,
        "--per_device_train_batch_size",
        "4",
    ]
    if how == "flag":
        args += ["--uds", "--uds_keep", "2"]
    else:
        config = tmp_path / "uds.yaml"
        config.write_text("uds_keep: 2\nuds_alpha: 0.002\n")
        args += ["--config", config]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err[-2000:]
    fractions = logged_in(out, "uds/selected_fraction")
    assert fractions and all(f == pytest.approx(0.5) for f in fractions)


def test_uds_fields_without_uds_are_refused(capsys, tmp_path, tiny_model_dir, data_dirs):
    """Without `--uds`, `uds_*` fields on the command line turn UDS on; a bad UDS value is a one-line error."""
    code, _, err = run_cli(
        capsys,
        "sft",
        *paths(tiny_model_dir, data_dirs["chat"], tmp_path),
        *CPU_FLAGS,
        "--uds_keep",
        "5",
    )
    _one_line_error(code, err, "uds_keep")


@pytest.mark.parametrize(
    "reward, needles",
    [
        ("shortest_reward", ("--reward_funcs shortest_reward", "not one of TRL's rewards", "accuracy_reward")),
        ("no_such_module.reward", ("--reward_funcs no_such_module.reward", "cannot import no_such_module")),
        (
            "hf_plugins.testing.no_reward",
            ("--reward_funcs hf_plugins.testing.no_reward", "has no function 'no_reward'"),
        ),
    ],
)
def test_grpo_reward_that_cannot_be_loaded(capsys, unloadable_model_dir, data_dirs, tmp_path, reward, needles):
    code, _, err = run_cli(
        capsys,
        "grpo",
        *paths(unloadable_model_dir, data_dirs["grpo"], tmp_path),
        *GRPO_FLAGS,
        "--reward_funcs",
        reward,
    )
    _one_line_error(code, err, *needles)


def test_grpo_input_errors_are_one_line_before_the_model_loads(capsys, unloadable_model_dir, data_dirs, tmp_path):
    common = ["--model_name_or_path", unloadable_model_dir, "--output_dir", tmp_path]
    flags = [
        flag for flag in GRPO_FLAGS if flag not in ("--reward_funcs", "hf_plugins.testing.replayed_completion_reward")
    ]
    code, _, err = run_cli(capsys, "grpo", *common, "--dataset_name", data_dirs["grpo"], *flags)
    _one_line_error(code, err, "no reward", "--reward_funcs")
    code, _, err = run_cli(capsys, "grpo", *common, "--dataset_name", data_dirs["chat"], *GRPO_FLAGS)
    _one_line_error(code, err, "columns `messages`", "needs a `prompt` column", "row['messages'][:-1]")
    code, _, err = run_cli(
        capsys, "grpo", *common, "--dataset_name", data_dirs["grpo"], *GRPO_FLAGS, "--top_entropy_quantile", "0.2"
    )
    _one_line_error(code, err, "top_entropy_quantile")
    code, _, err = run_cli(capsys, "grpo", *common, "--dataset_name", data_dirs["grpo"], *GRPO_FLAGS, "--uds")
    _one_line_error(code, err, "not an option of `hf-plugins grpo`")
    code, _, err = run_cli(capsys, "grpo", *common, "--dataset_name", data_dirs["grpo"], *GRPO_FLAGS, "--kl_coef", "1")
    _one_line_error(code, err, "`--kl_coef` is a field of `hf-plugins asft`")


def test_tl_grpo_input_errors_are_one_line_before_the_model_loads(capsys, unloadable_model_dir, data_dirs, tmp_path):
    """A dataset without the tools or the gold calls, or plain prompts without either, is refused with the missing
    columns before the (unloadable) model is read; so is a gold call that cannot be parsed."""
    from datasets import load_from_disk

    common = ["--model_name_or_path", unloadable_model_dir, "--output_dir", tmp_path, *cpu_flags("tl-grpo")]
    tools = load_from_disk(data_dirs["tools"])
    cases = {
        "no-gold": (tools.remove_columns("gold_call"), ["no `gold_call`", "gold_call_column"]),
        "no-tools": (tools.remove_columns("tools"), ["no `tools`", "declared tools"]),
        "no-prompts": (tools.remove_columns("messages"), ["no prompts", "`messages` column"]),
        "bad-gold": (tools.map(lambda row: {"gold_call": "no call here"}), ["row 0", "cannot be parsed"]),
    }
    for name, (dataset, _) in cases.items():
        dataset.save_to_disk(str(tmp_path / name))
    capsys.readouterr()  # the progress bars of the lines above
    for name, (_, needles) in cases.items():
        code, _, err = run_cli(capsys, "tl-grpo", *common, "--dataset_name", tmp_path / name)
        _one_line_error(code, err, *needles)
    code, _, err = run_cli(capsys, "tl-grpo", *common, "--dataset_name", data_dirs["grpo"])  # prompts only
    _one_line_error(code, err, "columns `prompt`", "no `tools` and `gold_call`")
    code, _, err = run_cli(capsys, "tl-grpo", *common, "--dataset_name", data_dirs["tools"], "--gold_call_column", "x")
    _one_line_error(code, err, "no `x`")
    # with good input the run reaches the model and fails there: the errors above came first
    code, _, err = run_cli(capsys, "tl-grpo", *common, "--dataset_name", data_dirs["tools"])
    assert code != 0 and "not-a-model-type" in err


def test_srppo_input_errors_are_one_line_before_the_model_loads(
    capsys, unloadable_model_dir, tiny_model_dir, tiny_sft_adapter_dir, data_dirs, tmp_path
):
    common = ["--model_name_or_path", unloadable_model_dir, "--output_dir", tmp_path, "--dataset_name"]
    common += [data_dirs["grpo"], *cpu_flags("srppo")]
    code, _, err = run_cli(capsys, "srppo", *common)
    _one_line_error(code, err, "neither source is set", "sft_adapter_path", "base_model")
    code, _, err = run_cli(capsys, "srppo", *common, "--base_model", tmp_path / "missing")
    _one_line_error(code, err, "--base_model", "no such folder")
    code, _, err = run_cli(capsys, "srppo", *common, "--sft_adapter_path", tmp_path / "missing")
    _one_line_error(code, err, "--sft_adapter_path", "no such folder")
    mismatched = ["--sft_adapter_path", tiny_sft_adapter_dir, "--base_model", tiny_model_dir]
    code, _, err = run_cli(capsys, "srppo", *common, *mismatched)
    _one_line_error(code, err, "is not the base of the policy")
    code, _, err = run_cli(capsys, "srppo", *common, "--sft_adapter_path", tiny_sft_adapter_dir, "--use_peft", "True")
    _one_line_error(code, err, "drop `peft_config`")
    code, _, err = run_cli(capsys, "srppo", *common, "--self_reward_normalization", "max")
    _one_line_error(code, err, "self_reward_normalization")
