r"""TruthRL's truthfulness reward (`hf_plugins.rewards.truthrl`) rule by rule against the reference scorer's rules, its
judge and its metrics; the reward in two steps of stock `trl.GRPOTrainer` and of `TruthRLTrainer` (FusedGRPOTrainer)
on the tiny model with replayed completions; `hf-plugins truthrl`; and the refusals of bad input."""

import os
import sys

import pytest
import torch
from datasets import Dataset
from test_cli import TRUTHRL_FLAGS, _one_line_error, run_cli
from testing_utils import logged, logged_in
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from hf_plugins import TruthRLConfig, TruthRLTrainer
from hf_plugins.rewards import (
    TRUTHRL_SYSTEM_PROMPT,
    extract_boxed,
    make_truthrl_reward,
    normalize_answer,
    truthrl_outcome,
    truthrl_reward,
)
from hf_plugins.testing import CPU_TRAINING_ARGS, ReplayedCompletions, tiny_truthrl_dataset


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # `rollout_func` is experimental in TRL 1.16

METRICS = ("accuracy", "abstain", "hallucination", "truthfulness", "no_boxed")


def score(completions, answers, reward=truthrl_reward, **columns):
    """The rewards and the logged metrics of one reward call."""
    logged_metrics = {}
    rewards = reward(
        prompts=["Question: q?\nAnswer:"] * len(completions),
        completions=completions,
        answers=answers,
        log_metric=lambda name, value: logged_metrics.__setitem__(name, value),
        **columns,
    )
    return rewards, logged_metrics


# ------------------------------------------------------------------------------------------------ extraction


def test_first_box_up_to_the_first_closing_brace_as_the_reference():
    assert extract_boxed(r"The answer is \boxed{ Paris }.") == "Paris"
    assert extract_boxed(r"\boxed{47} or maybe \boxed{48}") == "47"  # several boxes: the first
    assert extract_boxed("\\boxed{two\nlines}") == "two\nlines"  # the reference regex runs with DOTALL
    assert extract_boxed(r"\boxed{}") == ""
    assert extract_boxed("no box") is None
    assert extract_boxed(r"\boxed 47") is None and extract_boxed(r"\boxed{47") is None
    assert extract_boxed(None) is None and extract_boxed(47) is None
    # nested braces: the reference's non-greedy regex stops at the first `}`
    assert extract_boxed(r"\boxed{\frac{1}{2}} and \boxed{3}") == r"\frac{1"
    assert extract_boxed(r"\boxed{\text{Paris}}") == r"\text{Paris"


def test_balanced_braces_read_the_whole_box():
    assert extract_boxed(r"\boxed{\frac{1}{2}} and \boxed{3}", balanced_braces=True) == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{\text{Paris}}", balanced_braces=True) == r"\text{Paris}"
    assert extract_boxed(r"\boxed{\{1, 2\}}", balanced_braces=True) == r"\{1, 2\}"  # escaped braces are text
    assert extract_boxed(r"\boxed{47} \boxed{48}", balanced_braces=True) == "47"
    assert extract_boxed(r"\boxed{a{b}", balanced_braces=True) is None  # never closed
    assert extract_boxed(r"\boxed{a{b}") == "a{b"  # the reference's reading of the same text
    # the reward follows the option: only the balanced reading matches a gold answer with braces
    completion, gold = r"\boxed{\frac{1}{2} apples}", r"\frac{1}{2} apples"
    assert truthrl_outcome(completion, [gold]) == "hallucination"  # the reference reads `\frac{1`
    assert truthrl_outcome(completion, [gold], balanced_braces=True) == "correct"


def test_normalisation_is_squad_normalize_answer():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("I don't know.") == "i dont know"
    assert normalize_answer("An apple, a pear; the end") == "apple pear end"
    assert normalize_answer("theatre") == "theatre"  # whole words only
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("") == ""
    assert truthrl_outcome(r"\boxed{The PARIS.}", ["paris"]) == "correct"
    assert truthrl_outcome(r"\boxed{Paris}", ["The Paris!"]) == "correct"


# ------------------------------------------------------------------------------------------------ the rules


@pytest.mark.parametrize(
    "answer",
    ["I don't know", "i dont know", "I DON'T KNOW.", "Honestly, I don't know the answer!", "I   don't   know"],
)
def test_the_default_abstention_phrase_in_every_form(answer):
    assert truthrl_outcome(rf"\boxed{{{answer}}}", ["47"]) == "abstain"
    rewards, _ = score([rf"\boxed{{{answer}}}"], [["47"]])
    assert rewards == [0.0]
    rewards, _ = score([rf"\boxed{{{answer}}}"], [["47"]], reward=make_truthrl_reward(scheme="binary"))
    assert rewards == [-1.0]


def test_every_given_abstention_phrase_and_only_those():
    phrases = ("I don't know", "No idea", "cannot be determined")
    reward = make_truthrl_reward(abstain_phrases=phrases)
    completions = [r"\boxed{I don't know}", r"\boxed{no IDEA at all}", r"\boxed{It cannot be determined.}"]
    assert score(completions, [["47"]] * 3, reward=reward)[0] == [0.0, 0.0, 0.0]
    # the default phrase is not among them; an unboxed abstention is no abstention
    assert score([r"\boxed{unsure}", "I don't know"], [["47"]] * 2, reward=reward)[0] == [-1.0, -1.0]
    assert truthrl_outcome("I don't know", ["47"]) == "no_boxed"
    with pytest.raises(ValueError, match="abstain_phrases"):
        make_truthrl_reward(abstain_phrases=("!!",))
    with pytest.raises(ValueError, match="abstain_phrases"):
        make_truthrl_reward(abstain_phrases=())


def test_each_rule_in_the_reference_order():
    golds = [["47", "forty-seven"]]
    cases = {
        "no box at all": ("no_boxed", -1.0),
        r"\boxed{47}": ("correct", 1.0),
        r"the answer: \boxed{Forty-Seven.}": ("correct", 1.0),  # any gold answer, normalised
        r"\boxed{48}": ("hallucination", -1.0),
        r"\boxed{}": ("hallucination", -1.0),
        r"\boxed{I don't know 47}": ("abstain", 0.0),  # abstention is checked before the gold answers
        r"\boxed{invalid question}": ("invalid_question", -1.0),
    }
    for completion, (outcome, reward) in cases.items():
        assert truthrl_outcome(completion, golds[0]) == outcome, completion
        assert score([completion], golds)[0] == [reward], completion
    # "invalid question" is -1 even when it is the gold answer (checked before the gold answers, as the reference)
    assert score([r"\boxed{Invalid question.}"], [["invalid question"]])[0] == [-1.0]
    # a gold answer given as one string; no gold answer
    assert score([r"\boxed{47}", r"\boxed{47}"], ["47", None])[0] == [1.0, -1.0]


def test_binary_scores_abstention_as_wrong():
    reward = make_truthrl_reward(scheme="binary")
    completions = [r"\boxed{47}", r"\boxed{I don't know}", r"\boxed{12}", "none"]
    rewards, metrics = score(completions, [["47"]] * 4, reward=reward)
    assert rewards == [1.0, -1.0, -1.0, -1.0]
    # the metrics count outcomes, whatever the scheme pays for them
    assert metrics["truthrl/abstain"] == 0.25 and metrics["truthrl/accuracy"] == 0.25


@pytest.mark.parametrize("scheme", ["ternary_ook", "binary_ook"])
def test_out_of_knowledge_questions_reward_abstention(scheme):
    reward = make_truthrl_reward(scheme=scheme)
    completions = [r"\boxed{I don't know}", r"\boxed{47}", r"\boxed{invalid question}", "none"]
    completions += [r"\boxed{I don't know}", r"\boxed{47}"]
    ook = [True, True, True, True, False, False]
    rewards, metrics = score(completions, [["47"]] * 6, reward=reward, out_of_knowledge=ook)
    abstain_elsewhere = 0.0 if scheme == "ternary_ook" else -1.0
    # on an out-of-knowledge question: abstaining +1, any answer -1, even the "gold" one
    assert rewards == [1.0, -1.0, -1.0, -1.0, abstain_elsewhere, 1.0]
    assert metrics["truthrl/accuracy"] == pytest.approx(2 / 6) and metrics["truthrl/abstain"] == pytest.approx(1 / 6)
    # flags as the data may hold them; another column name
    reward = make_truthrl_reward(scheme=scheme, ook_column="unknowable")
    rewards, _ = score([r"\boxed{I don't know}"] * 4, [["47"]] * 4, reward=reward, unknowable=["true", 1, 0, None])
    assert rewards == [1.0, 1.0, abstain_elsewhere, abstain_elsewhere]


def test_metrics_are_the_fractions_of_the_call():
    completions = [r"\boxed{47}", r"\boxed{47}", r"\boxed{I don't know}", r"\boxed{3}", "nothing", r"\boxed{47}"]
    extra = {}
    rewards = truthrl_reward(
        prompts=["q"] * 6,
        completions=completions,
        answers=[["47"]] * 6,
        log_metric=lambda name, value: extra.__setitem__(name, value),
        log_extra=lambda column, values: extra.__setitem__(column, values),
    )
    assert rewards == [1.0, 1.0, 0.0, -1.0, -1.0, 1.0]
    accuracy, abstain = 3 / 6, 1 / 6
    hallucination = 1 - accuracy - abstain
    expected = {
        "truthrl/accuracy": accuracy,
        "truthrl/abstain": abstain,
        "truthrl/hallucination": hallucination,
        "truthrl/truthfulness": accuracy - hallucination,
        "truthrl/no_boxed": 1 / 6,
    }
    assert {name: extra[name] for name in expected} == pytest.approx(expected)
    assert extra["truthrl_outcome"] == ["correct", "correct", "abstain", "hallucination", "no_boxed", "correct"]


def test_malformed_input_is_scored_never_raises():
    completions = [
        None,
        47,
        {"role": "assistant", "content": r"\boxed{47}"},
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{47}"}]}],
        [{"role": "assistant", "content": None}],
        [object()],
        r"\boxed{47}",
        r"\boxed{47}",
    ]
    answers = [["47"], ["47"], ["47"], "47", ["47"], ["47"], 47, [None, "", "47"]]
    rewards, metrics = score(completions, answers)
    assert rewards == [-1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0]
    assert metrics["truthrl/no_boxed"] == pytest.approx(4 / 8)
    assert score([], [])[0] == []


def test_bad_columns_and_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="needs the dataset column `answers`"):
        truthrl_reward(prompts=["q"], completions=[r"\boxed{1}"], gold=[["1"]])
    with pytest.raises(ValueError, match="needs the dataset column `out_of_knowledge`"):
        make_truthrl_reward(scheme="ternary_ook")(prompts=["q"], completions=["x"], answers=[["1"]])
    with pytest.raises(ValueError, match="2 completions but 1 `answers`"):
        truthrl_reward(prompts=["q", "q"], completions=["a", "b"], answers=[["1"]])
    with pytest.raises(ValueError, match="not a TruthRL scheme"):
        make_truthrl_reward(scheme="quaternary")
    with pytest.raises(ValueError, match="scheme='ternary_ook'"):
        make_truthrl_reward(ook_column="unknowable")
    with pytest.raises(ValueError, match="must be a callable"):
        make_truthrl_reward(judge="my_module.judge")


# ------------------------------------------------------------------------------------------------ the judge


class RecordingJudge:
    """Says yes to the predictions it is told to accept; records every call."""

    def __init__(self, accept=()):
        self.accept = set(accept)
        self.calls = []

    def __call__(self, items):
        self.calls.append(list(items))
        return [prediction in self.accept for _, _, prediction in items]


def test_the_judge_is_asked_once_per_call_only_about_the_rows_that_need_it():
    judge = RecordingJudge(accept={"Forty seven"})
    reward = make_truthrl_reward(judge=judge, check_judge=False)
    completions = [r"\boxed{47}", r"\boxed{Forty seven}", r"\boxed{I don't know}", "none", r"\boxed{12}"]
    prompts = ["Context: Mira's locker number is 47.\nQuestion: What is Mira's locker number?\nAnswer:"] * 4
    prompts.append([{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 12?"}])
    rewards = reward(prompts=prompts, completions=completions, answers=[["47", "forty-seven"]] * 4 + [["13"]])
    assert rewards == [1.0, 1.0, 0.0, -1.0, -1.0]
    (call,) = judge.calls  # one batch: rows 1 (one item per gold answer) and 4, never the settled rows
    assert call == [
        (prompts[1], "47", "Forty seven"),
        (prompts[1], "forty-seven", "Forty seven"),
        ("What is 12?", "13", "12"),  # a conversation's question: its last user turn
    ]
    # nothing to judge: no call
    reward(prompts=["q"] * 2, completions=[r"\boxed{47}", r"\boxed{I don't know}"], answers=[["47"]] * 2)
    assert len(judge.calls) == 1
    # out-of-knowledge questions are never judged
    ook = make_truthrl_reward(scheme="ternary_ook", judge=judge, check_judge=False)
    ook(prompts=["q"], completions=[r"\boxed{Forty seven}"], answers=[["47"]], out_of_knowledge=[True])
    assert len(judge.calls) == 1


def test_a_judge_is_checked_before_training():
    judge = RecordingJudge()
    make_truthrl_reward(judge=judge)
    assert judge.calls == [[("What is the capital of France?", "Paris", "Paris")]]

    def broken_judge(items):
        raise ConnectionError("no judge server at localhost:8000")

    with pytest.raises(ValueError, match="judge .*broken_judge raised ConnectionError: no judge server"):
        make_truthrl_reward(judge=broken_judge)
    with pytest.raises(ValueError, match="one verdict .* per triple"):
        make_truthrl_reward(judge=lambda items: [])
    with pytest.raises(ValueError, match="one verdict .* per triple"):
        make_truthrl_reward(judge=lambda items: None)
    # unchecked, it fails at its first call with the same line, not with a silent -1
    reward = make_truthrl_reward(judge=broken_judge, check_judge=False)
    with pytest.raises(ValueError, match="broken_judge raised ConnectionError"):
        reward(prompts=["q"], completions=[r"\boxed{12}"], answers=[["47"]])


# ------------------------------------------------------------------------------------------------ trainers

#: Replayed completions (a mix of every outcome for the questions whose answer is 47)
BANK = [
    r" \boxed{47}",
    r" \boxed{I don't know}",
    " I think it is 47",
    r" \boxed{12}",
    r" \boxed{47} \boxed{12}",
    r" \boxed{invalid question}",
]


def truthrl_data(n=8):
    data = tiny_truthrl_dataset(n)
    return data.map(lambda row: {"answers": ["47"] if not row["out_of_knowledge"] else row["answers"]})


class Recorder:
    """The reward with every call's rewards kept."""

    def __init__(self, reward):
        self.reward, self.rewards = reward, []
        self.__name__ = reward.__name__
        self.truthrl_settings = reward.truthrl_settings

    def __call__(self, *args, **kwargs):
        rewards = self.reward(*args, **kwargs)
        self.rewards.append(rewards)
        return rewards


def run_two_steps(trainer_cls, model_dir, output_dir, reward_funcs, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config_cls = TruthRLConfig if trainer_cls is TruthRLTrainer else GRPOConfig
    args = config_cls(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        learning_rate=0.5,
        optim="sgd",
        beta=0.0,
        disable_dropout=True,
        disable_tqdm=True,
        **CPU_TRAINING_ARGS,
        **overrides,
    )
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=truthrl_data(),
        processing_class=tokenizer,
        rollout_func=ReplayedCompletions(tokenizer, 24, texts=BANK),
    )
    trainer.train()
    return trainer


def test_stock_grpo_trainer_and_truthrl_trainer_train_two_steps_on_the_reward(tiny_model_dir, tmp_path):
    stock_reward = Recorder(make_truthrl_reward())
    stock = run_two_steps(GRPOTrainer, tiny_model_dir, tmp_path / "stock", [stock_reward])
    fused = run_two_steps(TruthRLTrainer, tiny_model_dir, tmp_path / "fused", None)  # the reward from the config
    assert [func.__name__ for func in fused.reward_funcs] == ["truthrl_reward"]
    steps = [entry for entry in stock.state.log_history if "reward" in entry]
    assert len(steps) == 2
    for entry, rewards in zip(steps, stock_reward.rewards, strict=True):
        # the logged fractions are those of the step's rewards, and the replay mixes every outcome
        correct, abstain = rewards.count(1.0) / len(rewards), rewards.count(0.0) / len(rewards)
        assert entry["truthrl/accuracy"] == pytest.approx(correct)
        assert entry["truthrl/abstain"] == pytest.approx(abstain)
        assert entry["truthrl/hallucination"] == pytest.approx(1 - correct - abstain)
        assert entry["truthrl/truthfulness"] == pytest.approx(2 * correct + abstain - 1)
        assert entry["frac_reward_zero_std"] < 1
        assert entry["reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert any(entry["truthrl/no_boxed"] > 0 for entry in steps) and any(loss != 0 for loss in logged(stock))
    # identical completions: the fused trainer's rewards, metrics and losses are stock's
    fused_steps = [entry for entry in fused.state.log_history if "reward" in entry]
    for entry, reference in zip(fused_steps, steps, strict=True):
        for key in ("loss", "reward", "reward_std", *(f"truthrl/{name}" for name in METRICS)):
            assert entry[key] == pytest.approx(reference[key], abs=1e-6), key


def test_truthrl_trainer_builds_the_reward_from_its_config(tiny_model_dir, tmp_path):
    def judge(items):
        return [True] * len(items)

    def length_reward(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    trainer = TruthRLTrainer(
        model=tiny_model_dir,
        reward_funcs=[length_reward],  # added after the TruthRL reward
        args=TruthRLConfig(
            output_dir=str(tmp_path),
            truthrl_scheme="binary_ook",
            truthrl_abstain_phrases=["no idea"],
            truthrl_balanced_braces=True,
            **CPU_TRAINING_ARGS,
        ),
        train_dataset=truthrl_data(),
        judge=judge,
    )
    assert [func.__name__ for func in trainer.reward_funcs] == ["truthrl_reward", "length_reward"]
    settings = trainer.reward_funcs[0].truthrl_settings
    assert settings["scheme"] == "binary_ook" and settings["ook_column"] == "out_of_knowledge"
    assert settings["judge"] is judge and settings["abstain_phrases"] == ("no idea",) and settings["balanced_braces"]
    # a TruthRL reward given is used as it is
    own = make_truthrl_reward(answers_column="gold")
    data = truthrl_data().rename_column("answers", "gold")
    trainer = TruthRLTrainer(tiny_model_dir, own, TruthRLConfig(str(tmp_path), **CPU_TRAINING_ARGS), data)
    assert trainer.reward_funcs == [own]


def test_bad_input_is_refused_before_the_model_loads(tmp_path):
    never_loaded = str(tmp_path / "no-such-model")  # a refusal after this point would fail to load it instead
    args = dict(output_dir=str(tmp_path), **CPU_TRAINING_ARGS)
    data = truthrl_data()
    with pytest.raises(ValueError, match=r"the training dataset has no `answers` column .*--truthrl_answers_column"):
        TruthRLTrainer(never_loaded, args=TruthRLConfig(**args), train_dataset=data.remove_columns("answers"))
    with pytest.raises(ValueError, match=r"the evaluation \('hard'\) dataset has no `out_of_knowledge` column"):
        TruthRLTrainer(
            never_loaded,
            args=TruthRLConfig(truthrl_scheme="ternary_ook", **args),
            train_dataset=data,
            eval_dataset={"easy": data, "hard": data.remove_columns("out_of_knowledge")},
        )
    with pytest.raises(ValueError, match="judge=my_judge"):
        TruthRLTrainer(never_loaded, args=TruthRLConfig(truthrl_judge="my_judges.llm", **args), train_dataset=data)

    def broken_judge(items):
        raise TimeoutError("judge timed out")

    with pytest.raises(ValueError, match="broken_judge raised TimeoutError"):
        TruthRLTrainer(never_loaded, args=TruthRLConfig(**args), train_dataset=data, judge=broken_judge)
    with pytest.raises(ValueError, match="not a TruthRL scheme"):
        TruthRLConfig(truthrl_scheme="ternary_em", **args)
    with pytest.raises(ValueError, match="truthrl_scheme='binary_ook'"):
        TruthRLConfig(truthrl_scheme="binary", truthrl_ook_column="unknowable", **args)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        TruthRLConfig(remove_unused_columns=True, **args)


def test_system_prompt_asks_for_boxes_and_the_abstention_box():
    assert r"\boxed{}" in TRUTHRL_SYSTEM_PROMPT and r"\boxed{I don't know}" in TRUTHRL_SYSTEM_PROMPT
    prompt = tiny_truthrl_dataset(2, conversational=True)[0]["prompt"]
    assert prompt[0] == {"role": "system", "content": TRUTHRL_SYSTEM_PROMPT}
    data = tiny_truthrl_dataset(16, unknowable_fraction=0.25)
    assert sum(data["out_of_knowledge"]) == 4
    assert all(("Context:" in p) != unknowable for p, unknowable in zip(data["prompt"], data["out_of_knowledge"]))


# ------------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def question_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("truthrl-data")
    paths = {name: str(root / name) for name in ("good", "no_answers", "gold")}
    tiny_truthrl_dataset(8).save_to_disk(paths["good"])
    tiny_truthrl_dataset(8).remove_columns("answers").save_to_disk(paths["no_answers"])
    Dataset.from_dict({"prompt": ["q"], "gold": [["1"]]}).save_to_disk(paths["gold"])
    return paths


JUDGES = """
CALLS = []


def accept_all(items):
    CALLS.append(len(items))
    return [True] * len(items)


def broken(items):
    raise RuntimeError("the judge server is down")
"""


def test_cli_runs_two_steps_with_a_judge_by_import_path(capsys, tmp_path, tiny_model_dir, question_dirs, monkeypatch):
    (tmp_path / "my_judges.py").write_text(JUDGES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "truthrl",
        "--model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        question_dirs["good"],
        "--output_dir",
        out,
        "--truthrl_judge",
        "my_judges.accept_all",
        *TRUTHRL_FLAGS,
    )
    assert code == 0, err[-2000:]
    assert len(logged_in(out)) == 2
    assert sys.modules["my_judges"].CALLS[0] == 1  # the probe, before training
    assert len(logged_in(out, "truthrl/no_boxed")) == 2


def test_cli_refuses_bad_input_in_one_line(capsys, tmp_path, question_dirs, monkeypatch):
    (tmp_path / "my_judges.py").write_text(JUDGES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    unloadable = tmp_path / "unloadable"
    unloadable.mkdir()
    (unloadable / "config.json").write_text('{"model_type": "not-a-model-type-loading-this-would-fail"}')
    common = ["--model_name_or_path", unloadable, "--output_dir", tmp_path / "out", *TRUTHRL_FLAGS]
    code, _, err = run_cli(capsys, "truthrl", *common, "--dataset_name", question_dirs["no_answers"])
    _one_line_error(code, err, "has no `answers` column", "--truthrl_answers_column")
    code, _, err = run_cli(
        capsys, "truthrl", *common, "--dataset_name", question_dirs["good"], "--truthrl_judge", "my_judges.broken"
    )
    _one_line_error(code, err, "judge broken raised RuntimeError: the judge server is down")
    code, _, err = run_cli(
        capsys, "truthrl", *common, "--dataset_name", question_dirs["good"], "--truthrl_judge", "my_judges.missing"
    )
    _one_line_error(code, err, "--truthrl_judge my_judges.missing", "has no function 'missing'")
    code, _, err = run_cli(
        capsys, "truthrl", *common, "--dataset_name", question_dirs["good"], "--truthrl_scheme", "quaternary"
    )
    _one_line_error(code, err, "truthrl_scheme")
    code, _, err = run_cli(
        capsys, "truthrl", *common, "--dataset_name", question_dirs["gold"], "--truthrl_answers_column", "answer"
    )
    _one_line_error(code, err, "no `answer` column", "`gold`")
