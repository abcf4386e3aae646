"""TL-Training's RL stage: GRPO with `tool_call_reward` on the fused head (`FusedGRPOTrainer` as a drop-in, and
`TLGRPOTrainer`, which brings the reward and renders each row's tools into its prompt), against stock TRL
`GRPOTrainer` step by step on replayed tool calls, on the tiny offline model.

Both trainers get their completions from the same `rollout_func` (`ReplayedToolCalls`: variants of each row's gold
call in seven categories of the reward, so that the groups have a reward spread), so they train on identical data.
Per optimizer step the loss, every metric TRL logs (`tool_call/<category>` included) and every parameter must agree
to 1e-5, as in tests/test_grpo_trainer.py. Then: the prompts TLGRPOTrainer renders, extra reward functions, and the
inputs it refuses before any model loads.
"""

import json
import os

import pytest
from test_grpo_trainer import ARGS, ParameterRecorder, assert_logs_equal, assert_parameters_equal, step_logs
from testing_utils import logged
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from hf_plugins import FusedGRPOConfig, FusedGRPOTrainer, TLGRPOConfig, TLGRPOTrainer, tool_call_reward
from hf_plugins.data import render_tool_prompt
from hf_plugins.rewards import TOOL_CALL_CATEGORIES
from hf_plugins.testing import TOOL_CHAT_TEMPLATE, ReplayedToolCalls, tiny_tool_calling_dataset


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # `rollout_func` is experimental in TRL 1.16

#: Long enough for the tiny tokenizer's `name(key='value')` calls; the JSON variant is cut (a `format_error`)
MAX_COMPLETION = 48
SETTINGS = {**ARGS, "max_completion_length": MAX_COMPLETION, "per_device_train_batch_size": 8, "num_generations": 4}


@pytest.fixture(scope="module")
def tool_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with the tool-calling chat template, which renders `tools` and `<tool_call>` blocks."""
    folder = tmp_path_factory.mktemp("tiny-tool-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tool_rows(n=8, seed=1):
    return tiny_tool_calling_dataset(n, seed=seed)  # messages, tools, gold_call


def rendered(dataset, tokenizer):
    return dataset.map(render_tool_prompt, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"])


def make_trainer(kind, model_dir, output_dir, **overrides):
    """Stock GRPOTrainer or FusedGRPOTrainer with `tool_call_reward` on rendered prompts, or TLGRPOTrainer on the
    raw `messages` + `tools` rows (it renders them and brings the reward); all on the same replayed tool calls."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = rendered(tool_rows(), tokenizer)
    settings = {**SETTINGS, "output_dir": str(output_dir), **overrides}
    common = dict(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        processing_class=tokenizer,
        rollout_func=ReplayedToolCalls(tokenizer, prompts, MAX_COMPLETION),
    )
    if kind == "stock":
        trainer = GRPOTrainer(
            reward_funcs=[tool_call_reward], args=GRPOConfig(**settings), train_dataset=prompts, **common
        )
    elif kind == "fused":
        trainer = FusedGRPOTrainer(
            reward_funcs=[tool_call_reward], args=FusedGRPOConfig(**settings), train_dataset=prompts, **common
        )
    else:
        trainer = TLGRPOTrainer(args=TLGRPOConfig(**settings), train_dataset=tool_rows(), **common)
    recorder = ParameterRecorder()
    trainer.add_callback(recorder)
    trainer.parameter_steps = recorder.steps
    return trainer


CELLS = {
    "dapo-on_policy": {},
    "grpo-kl-off_policy": dict(loss_type="grpo", beta=0.04, gradient_accumulation_steps=2, steps_per_generation=4),
}


@pytest.mark.parametrize("kind", ["fused", "tl-grpo"])
@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS.keys())
def test_matches_stock_grpo_trainer_with_the_tool_call_reward(tool_model_dir, tmp_path, kind, cell):
    stock = make_trainer("stock", tool_model_dir, tmp_path / "stock", **cell)
    stock.train()
    fused = make_trainer(kind, tool_model_dir, tmp_path / kind, **cell)
    fused.train()
    assert_logs_equal(step_logs(fused), step_logs(stock))
    assert_parameters_equal(fused.parameter_steps, stock.parameter_steps)
    # the comparison is not of constants: several categories, a reward spread, losses that change
    steps = [entry for entry in step_logs(fused) if "tool_call/correct" in entry]  # the steps that generated
    per_call = fused.args.generation_batch_size  # each completion of a reward call in one category
    assert steps and all(sum(e[f"tool_call/{c}"] for c in TOOL_CALL_CATEGORIES) == per_call for e in steps)
    seen = {c for entry in steps for c in TOOL_CALL_CATEGORIES if entry[f"tool_call/{c}"] > 0}
    assert {"correct", "format_error", "wrong_value"} <= seen and len(seen) >= 5, seen
    assert all(entry["frac_reward_zero_std"] < 1 for entry in steps)
    losses = logged(fused)
    assert len(losses) == 2 and len(set(losses)) > 1


def test_prompts_are_rendered_with_each_rows_tools(tool_model_dir, tmp_path):
    """`messages` rows, conversational `prompt` rows and text prompts all reach generation as the same text."""
    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    expected = rendered(tool_rows(), tokenizer)
    trainer = make_trainer("tl-grpo", tool_model_dir, tmp_path / "messages")
    assert trainer.train_dataset["prompt"] == expected["prompt"]
    assert set(trainer.train_dataset.column_names) == {"prompt", "tools", "gold_call"}
    assert all(
        json.loads(tools)[0]["function"]["name"] in prompt
        for prompt, tools in zip(expected["prompt"], expected["tools"])
    )

    def before_the_first_call(row):
        first_call = next(i for i, message in enumerate(row["messages"]) if message["role"] == "assistant")
        return {"prompt": row["messages"][:first_call]}

    conversational = tool_rows().map(before_the_first_call, remove_columns=["messages"])
    for dataset in (conversational, expected):
        trainer = TLGRPOTrainer(
            model=tool_model_dir,
            args=TLGRPOConfig(**SETTINGS, output_dir=str(tmp_path / "other")),
            train_dataset=dataset,
            eval_dataset={"held_out": dataset},
            processing_class=tokenizer,
        )
        assert trainer.train_dataset["prompt"] == expected["prompt"]
        assert trainer.eval_dataset["held_out"]["prompt"] == expected["prompt"]


def test_reward_funcs_are_added_after_the_tool_call_reward(tool_model_dir, tmp_path):
    def length_reward(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    trainer = make_trainer("tl-grpo", tool_model_dir, tmp_path, max_steps=1)
    assert [f.__name__ for f in trainer.reward_funcs] == ["tool_call_reward"]
    trainer = TLGRPOTrainer(
        model=tool_model_dir,
        reward_funcs=length_reward,
        args=TLGRPOConfig(**SETTINGS, output_dir=str(tmp_path), reward_weights=[1.0, 0.01]),
        train_dataset=tool_rows(),
    )
    assert [f.__name__ for f in trainer.reward_funcs] == ["tool_call_reward", "length_reward"]


def test_lenient_parsing_and_another_gold_column(tool_model_dir, tmp_path):
    """`strict_tool_parsing=False` reads double-quoted values; `gold_call_column` names the gold calls' column."""
    dataset = tool_rows().rename_column("gold_call", "call")
    args = TLGRPOConfig(**SETTINGS, output_dir=str(tmp_path), gold_call_column="call", strict_tool_parsing=False)
    trainer = TLGRPOTrainer(model=tool_model_dir, args=args, train_dataset=dataset)
    (reward,) = trainer.reward_funcs
    row = dataset[0]
    double_quoted = row["call"].replace("'", '"')
    assert reward(prompts=["p"], completions=[double_quoted], call=[row["call"]], tools=[row["tools"]]) == [1.0]
    strict = make_trainer("tl-grpo", tool_model_dir, tmp_path / "strict", max_steps=1).reward_funcs[0]
    assert strict(prompts=["p"], completions=[double_quoted], gold_call=[row["call"]], tools=[row["tools"]]) == [-0.5]


MISSING_MODEL = "no/such-model"  # loading it would fail: an error about the data comes before


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda d: d.remove_columns("tools"), ["no `tools`", "declared tools"]),
        (lambda d: d.remove_columns("gold_call"), ["no `gold_call`", "gold_call_column"]),
        (lambda d: d.remove_columns(["tools", "gold_call"]), ["no `tools` and `gold_call`"]),
        (lambda d: d.remove_columns("messages"), ["no prompts", "`messages` column"]),
        (
            lambda d: d.map(lambda r, i: {"gold_call": "nothing" if i == 3 else r["gold_call"]}, with_indices=True),
            [
                "row 3",
                "cannot be parsed",
            ],
        ),
        (lambda d: d.map(lambda r: {"tools": "[not json"}), ["row 0", "not valid JSON"]),
    ],
    ids=["no-tools", "no-gold", "neither", "no-prompts", "bad-gold", "bad-tools"],
)
def test_bad_datasets_are_refused_before_the_model_loads(tmp_path, change, needles):
    args = TLGRPOConfig(**SETTINGS, output_dir=str(tmp_path))
    with pytest.raises(ValueError) as error:
        TLGRPOTrainer(model=MISSING_MODEL, args=args, train_dataset=change(tool_rows()))
    message = str(error.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    with pytest.raises(ValueError, match="The eval dataset"):  # the evaluation split too
        TLGRPOTrainer(model=MISSING_MODEL, args=args, train_dataset=tool_rows(), eval_dataset=change(tool_rows()))


def test_bad_arguments_are_refused(tmp_path):
    args = TLGRPOConfig(**SETTINGS, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not take `tools`"):
        TLGRPOTrainer(model=MISSING_MODEL, args=args, train_dataset=tool_rows(), tools=[len])
    with pytest.raises(ValueError, match="needs a `train_dataset`"):
        TLGRPOTrainer(model=MISSING_MODEL, args=args)
    for column in ("", "tools"):
        with pytest.raises(ValueError, match="gold_call_column"):
            TLGRPOConfig(**SETTINGS, output_dir=str(tmp_path), gold_call_column=column)
