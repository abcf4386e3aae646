"""HFT (Half Fine-Tuning): the category-level selection, freezing with our trainers and TRL's, the optimizer state,
per-epoch redraws, LoRA, resuming, the command line and the refusals."""

import json
import pickle
from collections import Counter

import pytest
import torch
from testing_utils import (
    CLI_CPU_FLAGS,
    CPU_ARGS,
    GRPO_ARGS,
    GRPO_MAX_COMPLETION,
    assert_same_parameters,
    logged,
    logged_in,
    make_trainer,
    tiny_lora_config,
    train_and_list_changed_parameters,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from hf_plugins.callbacks.hft import HFTCallback, apply_hft, check_redraw_possible
from hf_plugins.cli import main
from hf_plugins.testing import (
    ReplayedCompletions,
    build_tiny_model,
    build_tokenizer,
    replayed_completion_reward,
    tiny_conversational_dataset,
    tiny_prompt_completion_dataset,
)
from hf_plugins.trainers import (
    FusedGRPOConfig,
    FusedGRPOTrainer,
    FusedSFTConfig,
    FusedSFTTrainer,
    with_hft,
    with_uds,
)


HFTSFTTrainer, HFTSFTConfig = with_hft(FusedSFTTrainer), with_hft(FusedSFTConfig)
#: 3 epochs of 2 optimizer steps (32 conversations, batches of 16), for the redraw tests
EPOCHS = dict(max_steps=-1, num_train_epochs=3, per_device_train_batch_size=16)
#: Tensors HFT never freezes
ALWAYS_TRAINED = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def frozen_leaves(selection, layer, category):
    return selection.per_layer[layer][category]


def _optimizer(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


# ------------------------------------------------------------------------------------------------ the selection


@pytest.mark.parametrize("num_layers", [4, 3])
@pytest.mark.parametrize("balance", ["count", "params"])
def test_the_frozen_set_follows_the_category_rule(tokenizer, num_layers, balance):
    """Per layer: 2 of Q/K/V/O, 1 of the 2 norms; 2 of gate/up/down in `L // 2` layers and 1 in the others; the
    embeddings, the final norm and the lm_head trainable; `requires_grad` is the selection."""
    model = build_tiny_model(tokenizer, num_layers=num_layers)
    for seed in range(5):
        selection = apply_hft(model, seed=seed, balance=balance)
        feed_forward = Counter()
        for index in range(num_layers):
            layer = f"model.layers.{index}"
            assert len(frozen_leaves(selection, layer, "attention")) == 2
            assert len(frozen_leaves(selection, layer, "norm")) == 1
            feed_forward[len(frozen_leaves(selection, layer, "feed_forward"))] += 1
        assert feed_forward == {2: num_layers // 2, 1: num_layers - num_layers // 2}
        frozen = set(selection.frozen)
        for name, parameter in model.named_parameters():
            assert parameter.requires_grad == (name not in frozen), name
        assert not frozen & set(ALWAYS_TRAINED)
        assert len(selection.frozen) + len(selection.trainable) == 9 * num_layers
        assert frozen == {f"{module}.weight" for module in selection.frozen_modules}


def test_params_balance_freezes_half_of_the_parameters_with_grouped_query_attention(tokenizer):
    """With K/V 8x smaller than Q/O, `balance="params"` freezes one of Q/O and one of K/V per layer: within one
    tensor of 50% of the parameters (Qwen2's biases included); the plain count rule misses by more for some seeds."""
    shape = dict(arch="qwen2", hidden_size=64, num_heads=8, num_kv_heads=1, num_layers=4)
    model = build_tiny_model(tokenizer, **shape)
    largest = max(p.numel() for p in model.model.layers.parameters())
    misses = []
    for seed in range(8):
        selection = apply_hft(model, seed=seed, balance="params")
        assert abs(selection.frozen_numel - selection.managed_numel / 2) <= largest
        for index in range(4):
            pair = frozen_leaves(selection, f"model.layers.{index}", "attention")
            assert len(set(pair) & {"q_proj", "o_proj"}) == 1 and len(set(pair) & {"k_proj", "v_proj"}) == 1
        counted = apply_hft(model, seed=seed, balance="count")
        misses.append(abs(counted.frozen_numel - counted.managed_numel / 2) > largest)
    assert any(misses)


def test_the_selection_is_reproducible(tokenizer):
    first = apply_hft(build_tiny_model(tokenizer, num_layers=4), seed=7)
    again = apply_hft(build_tiny_model(tokenizer, num_layers=4), seed=7)
    assert first.frozen == again.frozen and first.per_layer == again.per_layer
    others = {apply_hft(build_tiny_model(tokenizer, num_layers=4), seed=seed).frozen for seed in range(5)}
    assert len(others) > 1


def test_other_ratios_spread_the_fraction_over_the_layers(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=4)
    selection = apply_hft(model, ratio=0.25, seed=0)
    counts = {c: [len(selection.per_layer[f"model.layers.{i}"][c]) for i in range(4)] for c in selection.per_layer[
        "model.layers.0"]}  # fmt: skip
    assert counts["attention"] == [1, 1, 1, 1]  # 0.25 * 4
    assert sorted(counts["feed_forward"]) == [0, 1, 1, 1]  # 0.75 * 3 per layer: floor(4 * 0.75) layers freeze one
    assert sorted(counts["norm"]) == [0, 0, 1, 1]  # 0.5 per layer


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, True])
def test_a_ratio_outside_the_open_interval_is_refused(tokenizer, tmp_path, ratio):
    with pytest.raises(ValueError, match=r"^`ratio=.*in \(0, 1\)") as error:
        apply_hft(build_tiny_model(tokenizer), ratio=ratio)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^`hft_ratio=.*in \(0, 1\)"):
        HFTSFTConfig(str(tmp_path), hft_ratio=ratio, **CPU_ARGS)


@pytest.mark.parametrize(
    "field, value, needle",
    [("hft_balance", "tensors", "hft_balance"), ("hft_redraw", "step", "hft_redraw")],
)
def test_bad_config_values_are_refused(tmp_path, field, value, needle):
    with pytest.raises(ValueError, match=needle):
        HFTSFTConfig(str(tmp_path), **{field: value}, **CPU_ARGS)


def test_models_without_the_expected_modules_are_refused(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no decoder layer with q_proj.*c_attn.*not supported"):
        apply_hft(gpt2)
    with pytest.raises(ValueError, match="has no gate_proj, up_proj, down_proj.*mixtures of experts"):
        apply_hft(build_tiny_model(tokenizer, arch="qwen3_moe"))
    from peft import get_peft_model

    on_the_head = get_peft_model(build_tiny_model(tokenizer), tiny_lora_config(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="no trainable adapter modules.*all-linear"):
        apply_hft(on_the_head)


def test_redraw_is_refused_under_sharded_or_multi_process_training(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="hft_redraw='epoch'.*DeepSpeed.*hft_redraw='stage'"):
        HFTSFTConfig(str(tmp_path), hft_redraw="epoch", deepspeed={"zero_optimization": {"stage": 3}}, **CPU_ARGS)

    class TwoProcesses:
        fsdp, deepspeed, world_size = "", None, 2

    with pytest.raises(ValueError, match=r"2 processes \(DDP\)"):
        check_redraw_possible(TwoProcesses(), "epoch")
    check_redraw_possible(TwoProcesses(), "stage")  # one draw per run works on any engine


def test_a_stock_optimizer_cannot_redraw(tmp_path, tiny_model_dir):
    """`HFTCallback` alone on a stock trainer: its optimizer lacks the frozen tensors, so redrawing is refused."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_hft(model, seed=0)
    trainer = make_trainer(
        SFTTrainer, SFTConfig, tiny_model_dir, tmp_path, model=model, trainer_kwargs=dict(
            callbacks=[HFTCallback(model.hft_selector, redraw="epoch")])
    )  # fmt: skip
    with pytest.raises(ValueError, match="optimizer does not hold.*with_hft"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ training


def test_only_the_trainable_half_changes_and_the_optimizer_holds_nothing_else(tmp_path, tiny_model_dir):
    trainer = make_trainer(HFTSFTTrainer, HFTSFTConfig, tiny_model_dir, tmp_path, hft_seed=3)
    changed = train_and_list_changed_parameters(trainer)
    selection = trainer.hft_selection
    assert changed == set(selection.trainable) | set(ALWAYS_TRAINED)
    held = {id(p) for group in _optimizer(trainer).param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert held == trainable and set(map(id, _optimizer(trainer).state)) == trainable
    assert "hft" in trainer._tag_names


def test_the_fused_trainer_equals_stock_sft_on_the_same_half(tmp_path, tiny_model_dir):
    """`with_hft(FusedSFTTrainer)`, stock `SFTTrainer` on an `apply_hft` model and `with_hft(SFTTrainer)`: the same
    frozen set, the same losses and parameters step by step."""
    sgd = dict(optim="sgd", learning_rate=0.5)  # as the stock comparisons of FusedSFTTrainer: Adam amplifies noise
    ours = make_trainer(HFTSFTTrainer, HFTSFTConfig, tiny_model_dir, tmp_path / "ours", hft_seed=5, **sgd)
    ours.train()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    selection = apply_hft(model, seed=5)
    stock = make_trainer(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path / "stock", model=model, **sgd)
    changed = train_and_list_changed_parameters(stock)
    mixed = make_trainer(
        with_hft(SFTTrainer), with_hft(SFTConfig), tiny_model_dir, tmp_path / "mixed", hft_seed=5, **sgd
    )
    mixed.train()
    assert ours.hft_selection.frozen == selection.frozen == mixed.hft_selection.frozen
    assert not changed & set(selection.frozen)
    assert logged(ours) == pytest.approx(logged(stock), abs=1e-5, rel=1e-5)
    assert logged(mixed) == pytest.approx(logged(stock), abs=1e-5, rel=1e-5)
    assert len({round(x, 6) for x in logged(ours)}) > 1
    assert_same_parameters(stock, ours)
    assert_same_parameters(stock, mixed)


def test_dpo_trains_the_same_half(tmp_path, tiny_model_dir):
    """`with_hft(DPOTrainer)`: stock DPO (its reference model made by the trainer) trains the kept half only."""
    rows = tiny_prompt_completion_dataset(8)
    rejected = [rows[(i + 1) % len(rows)]["completion"] for i in range(len(rows))]
    pairs = rows.rename_column("completion", "chosen").add_column("rejected", rejected)
    args = with_hft(DPOConfig)(str(tmp_path), **{**CPU_ARGS, "max_steps": 2, "per_device_train_batch_size": 4})
    trainer = with_hft(DPOTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=pairs,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    changed = train_and_list_changed_parameters(trainer)
    assert changed == set(trainer.hft_selection.trainable) | set(ALWAYS_TRAINED)


def test_our_grpo_trainer_trains_the_same_half(tmp_path, tiny_model_dir):
    """`with_hft(FusedGRPOTrainer)`, on replayed completions: only the kept half (and the embeddings, final norm and
    lm_head) changes."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = with_hft(FusedGRPOTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=replayed_completion_reward,
        args=with_hft(FusedGRPOConfig)(str(tmp_path), **GRPO_ARGS, hft_seed=2),
        train_dataset=tiny_prompt_completion_dataset(8).select_columns(["prompt"]),
        processing_class=tokenizer,
        rollout_func=ReplayedCompletions(tokenizer, GRPO_MAX_COMPLETION),
    )
    changed = train_and_list_changed_parameters(trainer)
    assert changed == set(trainer.hft_selection.trainable) | set(ALWAYS_TRAINED)


def _expected_step_counts(selector, epochs, steps_per_epoch):
    """Adam's step count of each tensor at the end of a run that redraws every epoch and resets the state of every
    tensor whose status changed: the steps since it last became trainable, or no state when frozen at the end."""
    counts = {}
    for name in selector.managed:
        steps = 0
        for epoch in range(epochs):
            if name in selector.draw(epoch).frozen:
                steps = None
            else:
                steps = (steps or 0) + steps_per_epoch
        counts[name] = steps
    return counts


def test_redraw_resets_exactly_the_states_of_the_tensors_that_changed(tmp_path, tiny_model_dir):
    trainer = make_trainer(HFTSFTTrainer, HFTSFTConfig, tiny_model_dir, tmp_path, hft_seed=2, hft_redraw="epoch",
                           **EPOCHS)  # fmt: skip
    trainer.train()
    selector = trainer.hft_callback.selector
    assert selector.selection.draw == 2 and [epoch for epoch, _ in trainer.hft_callback.resets] == [1, 2]
    held = {id(p) for group in _optimizer(trainer).param_groups for p in group["params"]}
    assert held == {id(p) for p in trainer.model.parameters()}  # every tensor HFT may unfreeze
    parameters = dict(trainer.model.named_parameters())
    state = _optimizer(trainer).state
    expected = _expected_step_counts(selector, epochs=3, steps_per_epoch=2)
    assert any(count is None for count in expected.values()) and len(set(expected.values())) > 2
    for name, count in expected.items():
        got = state.get(parameters[name])
        assert (None if got is None else int(got["step"])) == count, name
    for name in ALWAYS_TRAINED:
        assert int(state[parameters[name]]["step"]) == 6


def test_resuming_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    """A run that redraws every epoch, checkpointed at every step: resumed at the end of the first epoch (step 2,
    before a redraw) and inside the second (step 3, after one), it gives the uninterrupted run's losses and
    parameters, with the checkpoint's selection and optimizer state."""

    def build(output_dir=tmp_path, **overrides):
        settings = dict(hft_seed=4, hft_redraw="epoch", save_strategy="steps", save_steps=1, **EPOCHS)
        return make_trainer(HFTSFTTrainer, HFTSFTConfig, tiny_model_dir, output_dir, **{**settings, **overrides})

    full = build()
    full.train()
    for step in (2, 3):
        checkpoint = tmp_path / f"checkpoint-{step}"
        assert json.loads((checkpoint / "hft_state.json").read_text())["draw"] == {2: 0, 3: 1}[step]
        resumed = build(tmp_path / f"resumed-{step}")
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert logged(resumed)[step:] == pytest.approx(logged(full)[step:], abs=1e-6)
        assert_same_parameters(full, resumed)
    other = build(tmp_path / "other", hft_seed=5)
    with pytest.raises(ValueError, match="trained with HFT seed=4.*hft_seed=5"):
        other.train(resume_from_checkpoint=str(checkpoint))


def test_lora_freezes_half_of_the_adapter_modules(tmp_path, tiny_model_dir):
    """With adapters on every linear module, the rule picks among the adapted modules (no norm has an adapter); the
    base weights stay frozen and only the kept adapters train. With adapters on Q and V only, 1 of the 2 per layer."""
    lora = tiny_lora_config(target_modules="all-linear")
    trainer = make_trainer(HFTSFTTrainer, HFTSFTConfig, tiny_model_dir, tmp_path, peft_config=lora, hft_seed=0)
    changed = train_and_list_changed_parameters(trainer)
    selection = trainer.hft_selection
    assert changed == set(selection.trainable) and all(
        "lora_" in name for name in trainer.hft_callback.selector.managed
    )
    for index in range(2):
        layer = f"base_model.model.model.layers.{index}"
        assert len(selection.per_layer[layer]["attention"]) == 2 and selection.per_layer[layer]["norm"] == []
    assert sorted(len(selection.per_layer[f"base_model.model.model.layers.{i}"]["feed_forward"]) for i in range(2)) == [
        1, 2]  # fmt: skip
    two = make_trainer(HFTSFTTrainer, HFTSFTConfig, tiny_model_dir, tmp_path / "qv", peft_config=tiny_lora_config())
    for index in range(2):
        assert len(two.hft_selection.per_layer[f"base_model.model.model.layers.{index}"]["attention"]) == 1


def test_the_config_pickles_composed_with_uds(tmp_path):
    config = with_hft(with_uds(FusedSFTConfig))(
        str(tmp_path), hft_ratio=0.25, uds_keep=2, per_device_train_batch_size=4, **CPU_ARGS
    )
    again = pickle.loads(pickle.dumps(config))
    assert type(again) is type(config) and again.hft_ratio == 0.25 and again.uds_keep == 2


# ------------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hft-chat")
    tiny_conversational_dataset(8).save_to_disk(str(folder))
    return str(folder)


def _cli(capsys, model_dir, data_dir, out, *extra):
    argv = ["sft", "--model_name_or_path", model_dir, "--dataset_name", data_dir, "--output_dir", out,
            *CLI_CPU_FLAGS, "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            *extra]  # fmt: skip
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_the_command_line_trains_half_of_the_model(capsys, tmp_path, tiny_model_dir, chat_dir, how):
    if how == "flag":
        extra = ["--hft", "--hft_seed", "3"]
    else:
        (tmp_path / "hft.yaml").write_text("hft_seed: 3\nhft_balance: params\n")
        extra = ["--config", tmp_path / "hft.yaml"]
    code, err = _cli(capsys, tiny_model_dir, chat_dir, tmp_path / "out", *extra)
    assert code == 0, err[-2000:]
    assert len(logged_in(tmp_path / "out")) == 2
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    trained = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    expected = apply_hft(AutoModelForCausalLM.from_pretrained(tiny_model_dir), seed=3,
                         balance="count" if how == "flag" else "params")  # fmt: skip
    unchanged = {name for name in base if torch.equal(base[name], trained[name])}
    assert unchanged == set(expected.frozen)


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_a_bad_ratio_on_the_command_line_is_one_line(capsys, tmp_path, tiny_model_dir, chat_dir, value):
    code, err = _cli(capsys, tiny_model_dir, chat_dir, tmp_path, "--hft_ratio", value)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "hft_ratio" in lines[0] and "(0, 1)" in lines[0]


def test_a_model_hft_cannot_select_in_is_refused_on_the_command_line(capsys, tmp_path, tokenizer, chat_dir):
    """From the model's config, before the data or the weights load: one line, exit status 2."""
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()  # what saving printed
    code, err = _cli(capsys, folder, chat_dir, tmp_path / "out", "--hft")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "no decoder layer with q_proj" in lines[0] and "c_attn" in lines[0]
