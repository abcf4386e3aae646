"""MFT (Masked Thought Fine-Tuning): the position sampler and the schedule against the official rule, the `<mask>`
token's initialisation, and `MFTTrainer`: SFT's loss on the masked inputs (stock TRL replayed on them), clean
evaluation, the schedule per optimizer step (with data-loader workers too), resume, LoRA, UDS and bad input.
"""

import math
import os
import shutil
from functools import partial

import pytest
import testing_utils
import torch
from test_cli import CPU_FLAGS, paths, run_cli
from testing_utils import (
    CPU_ARGS,
    IGNORE,
    assert_same_parameters,
    checkpointed_with_evaluation,
    logged,
    tiny_lora_config,
    train_and_list_changed_parameters,
    uninterrupted_and_resumed,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import SFTConfig, SFTTrainer

from hf_plugins import FusedSFTConfig, FusedSFTTrainer, MFTConfig, MFTTrainer, with_uds
from hf_plugins.data.mft import (
    MASK_TOKEN,
    add_mask_token,
    draw_mask_uniforms,
    mask_response_tokens,
    sample_masked_positions,
    scheduled_mask_rate,
)
from hf_plugins.testing import build_tiny_model, build_tokenizer, tiny_conversational_dataset


# -------------------------------------------------------------------------------------------------- the sampler


def response_labels(generator, batch=6, length=20):
    """Labels `[batch, length]`: per row a prompt (-100), a response of random length and right padding (-100)."""
    labels = torch.full((batch, length), IGNORE)
    for row in range(batch):
        start = int(torch.randint(1, 8, (1,), generator=generator))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=generator))
        labels[row, start:end] = torch.randint(0, 50, (end - start,), generator=generator)
    return labels


def official_positions(labels, rate, uniforms):
    """The official rule written out per sequence (`mask_policy_utils.get_gpt_masked_input`): the response positions
    as candidates, a Bernoulli(rate) trial per candidate counts k, then k candidates without replacement (here: the k
    of smallest key, the draw `sample_masked_positions` makes from the same uniforms)."""
    masked = torch.zeros(labels.shape, dtype=torch.bool)
    for row in range(labels.shape[0]):
        candidates = [j for j in range(labels.shape[1]) if labels[row, j] != IGNORE]
        k = sum(1 for j in candidates if uniforms[row, j, 0] < rate)
        chosen = sorted(candidates, key=lambda j: float(uniforms[row, j, 1]))[:k]
        masked[row, chosen] = True
    return masked


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.6, 1.0])
def test_sampler_follows_the_official_rule(rate):
    g = testing_utils.gen(0)
    labels = response_labels(g)
    uniforms = draw_mask_uniforms(labels, g)
    masked = sample_masked_positions(labels, rate, uniforms)
    assert torch.equal(masked, official_positions(labels, rate, uniforms))
    assert not masked[labels == IGNORE].any()  # never the prompt or the padding
    if rate == 0:
        assert not masked.any()
    if rate == 1:
        assert torch.equal(masked, labels != IGNORE)


def test_masked_counts_are_binomial_and_positions_uniform():
    """Over many sequences with n = 10 response tokens the count has the Binomial(n, p) mean and variance, and every
    response position is masked with probability p."""
    n, p, rows = 10, 0.3, 20000
    labels = torch.full((rows, 16), IGNORE)
    labels[:, 3:13] = 7
    masked = sample_masked_positions(labels, p, draw_mask_uniforms(labels, testing_utils.gen(1)))
    counts = masked.sum(-1).double()
    assert counts.mean().item() == pytest.approx(n * p, abs=5 * math.sqrt(n * p * (1 - p) / rows))
    assert counts.var().item() == pytest.approx(n * p * (1 - p), rel=0.05)
    per_position = masked[:, 3:13].double().mean(0)
    assert torch.allclose(per_position, torch.full_like(per_position, p), atol=5 * math.sqrt(p * (1 - p) / rows))


@pytest.mark.parametrize("replace_rate", [0.0, 0.5, 1.0])
def test_replacement_tokens(replace_rate):
    g = testing_utils.gen(2)
    labels = response_labels(g, batch=64, length=40)
    input_ids = torch.where(labels == IGNORE, 3, labels)
    clean = input_ids.clone()
    mask_id, vocab = 99, 50
    masked_ids, masked = mask_response_tokens(
        input_ids, labels, 0.5, generator=g, mask_token_id=mask_id, replace_rate=replace_rate, vocab_size=vocab
    )
    assert torch.equal(input_ids, clean)  # the inputs are copied, never written
    assert torch.equal(masked_ids[~masked], clean[~masked])
    replaced = masked_ids[masked]
    is_mask = replaced == mask_id
    assert ((replaced >= 0) & (replaced < vocab) | is_mask).all()
    share_random = 1 - is_mask.double().mean().item()
    assert share_random == pytest.approx(replace_rate, abs=0.06)
    if replace_rate == 1:  # the mask token is never needed
        ids, _ = mask_response_tokens(
            clean, labels, 0.5, generator=g, mask_token_id=None, replace_rate=1, vocab_size=5
        )
        assert ids.max() < 50


def test_one_batch_masks_what_its_sequences_mask_one_by_one():
    """Consecutive draws of a CPU generator concatenate: a batch of four equal-length sequences masks what four
    batches of one do (the premise of gradient accumulation 4x1 == 1x4)."""
    labels = response_labels(testing_utils.gen(3), batch=4)
    together = sample_masked_positions(labels, 0.4, draw_mask_uniforms(labels, testing_utils.gen(9)))
    g = testing_utils.gen(9)
    apart = [sample_masked_positions(row[None], 0.4, draw_mask_uniforms(row[None], g)) for row in labels]
    assert torch.equal(together, torch.cat(apart))


def test_schedule_first_last_and_middle_steps():
    T, p = 30, 0.4
    assert scheduled_mask_rate(0, T, p) == 0.0  # the first step trains unmasked
    assert scheduled_mask_rate(T - 1, T, p) == p  # the last step at p_max
    assert scheduled_mask_rate(10, T, p) == pytest.approx(p * 10 / (2 / 3 * T + 1))
    ramp = [scheduled_mask_rate(t, T, p) for t in range(T)]
    assert ramp == sorted(ramp) and max(ramp) == p
    # reaches p_max once t >= r * T + 1
    assert scheduled_mask_rate(21, T, p) == p and scheduled_mask_rate(20, T, p) < p


# ------------------------------------------------------------------------------------------------ the <mask> token


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_mask_token_rows_are_the_mean_of_the_existing_rows(tied):
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, tie_word_embeddings=tied, dtype=torch.float64)
    inputs, outputs = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    token_id = add_mask_token(model, tokenizer)
    assert (
        token_id == len(tokenizer) - 1 == inputs.shape[0] and tokenizer.convert_ids_to_tokens(token_id) == MASK_TOKEN
    )
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == inputs.shape[0] + 1 == model.config.vocab_size
    torch.testing.assert_close(new_in[token_id], inputs.mean(0))
    torch.testing.assert_close(new_out[token_id], outputs.mean(0))
    assert torch.equal(new_in[:token_id], inputs) and torch.equal(new_out[:token_id], outputs)
    assert (new_in is new_out) == tied
    # a second call finds the token and changes nothing
    assert add_mask_token(model, tokenizer) == token_id and model.get_input_embeddings().weight.shape == new_in.shape


def test_mask_token_in_spare_embedding_rows_is_not_resized():
    """A model whose embedding matrix has rows no token uses: the new id gets one of them, set to the mean of the
    tokenizer's rows only."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, dtype=torch.float64)
    model.resize_token_embeddings(len(tokenizer) + 8, mean_resizing=False)
    rows = model.get_input_embeddings().weight.clone()
    token_id = add_mask_token(model, tokenizer)
    assert model.get_input_embeddings().weight.shape == rows.shape
    torch.testing.assert_close(model.get_input_embeddings().weight[token_id], rows[:token_id].mean(0))


# -------------------------------------------------------------------------------------------------- the trainer

MFT_ARGS = dict(CPU_ARGS, assistant_only_loss=True)
make_trainer = partial(testing_utils.make_trainer, MFTTrainer, MFTConfig, **MFT_ARGS)
# masking from the first step, half mask tokens (the pad token: no new row) and half random tokens
CONSTANT = dict(mask_rate=0.5, mask_rate_schedule="constant", replace_rate=0.5, mask_token="pad")


class RecordingMFTTrainer(MFTTrainer):
    """Keeps every training micro-batch's clean and masked input ids and its labels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = []

    def loss_method_inputs(self, model, inputs, extra_columns):
        clean = inputs["input_ids"].clone()
        groups = super().loss_method_inputs(model, inputs, extra_columns)
        if self.model.training:
            self.recorded.append((clean, inputs["input_ids"].clone(), inputs["labels"].clone()))
        return groups


class ReplayedSFTTrainer(SFTTrainer):
    """Stock TRL `SFTTrainer` fed the given input ids, micro-batch by micro-batch, in place of the collated ones."""

    def __init__(self, *args, replayed, **kwargs):
        super().__init__(*args, **kwargs)
        self.replayed = list(replayed)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            clean, masked, labels = self.replayed.pop(0)
            assert torch.equal(inputs["input_ids"], clean) and torch.equal(inputs["labels"], labels)
            inputs = {**inputs, "input_ids": masked}
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_loss_is_stock_sft_on_the_masked_inputs(tiny_model_dir, tmp_path):
    """Step for step, MFT's losses and parameters are those of TRL's SFTTrainer trained on MFT's masked inputs with
    the original labels; the masks cover response tokens only."""
    # plain SGD keeps the parameter comparison meaningful (Adam turns float noise in near-zero gradients into
    # full-size steps of either sign)
    sgd = dict(MFT_ARGS, optim="sgd", learning_rate=0.5, max_steps=3)
    mft = testing_utils.make_trainer(
        RecordingMFTTrainer, MFTConfig, tiny_model_dir, tmp_path / "mft", **sgd, **CONSTANT
    )
    mft.train()
    assert len(mft.recorded) == 3
    for clean, masked, labels in mft.recorded:
        changed = masked != clean
        assert changed.any() and not changed[labels == IGNORE].any()
    stock = testing_utils.make_trainer(
        ReplayedSFTTrainer,
        SFTConfig,
        tiny_model_dir,
        tmp_path / "stock",
        **sgd,
        trainer_kwargs={"replayed": mft.recorded},
    )
    stock.train()
    assert not stock.replayed
    assert logged(mft) == pytest.approx(logged(stock), abs=1e-6)
    assert_same_parameters(stock, mft)
    rates, fractions = logged(mft, "mft/mask_rate"), logged(mft, "mft/masked_fraction")
    assert rates == [0.5] * 3 and all(0.2 < f < 0.8 for f in fractions)


@pytest.mark.parametrize(
    "layout",
    [dict(packing=True, max_length=128), dict(padding_free=True, max_length=None)],
    ids=["bfd", "padding_free"],
)
def test_packed_batches_mask_response_tokens_only(tiny_model_dir, tmp_path, layout):
    trainer = testing_utils.make_trainer(
        RecordingMFTTrainer, MFTConfig, tiny_model_dir, tmp_path, **{**MFT_ARGS, **CONSTANT, **layout}
    )
    trainer.train()
    for clean, masked, labels in trainer.recorded:
        changed = masked != clean
        assert clean.shape[0] == 1 and changed.any() and not changed[labels == IGNORE].any()
    assert all(math.isfinite(x) for x in logged(trainer))


def test_zero_mask_rate_is_fused_sft(tiny_model_dir, tmp_path):
    mft = make_trainer(tiny_model_dir, tmp_path / "mft", mask_rate=0.0)
    sft = testing_utils.make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path / "sft", **MFT_ARGS)
    mft.train()
    sft.train()
    assert logged(mft) == pytest.approx(logged(sft), abs=1e-9)
    assert len(mft.processing_class) == len(sft.processing_class)  # no <mask> token without masking


def test_evaluation_sees_clean_inputs(tiny_model_dir, tmp_path):
    """Evaluation draws nothing from the masking generator and gives FusedSFTTrainer's loss on the same model;
    evaluating during training leaves the training losses as they are."""
    eval_data = tiny_conversational_dataset(8, seed=1)
    mft = make_trainer(tiny_model_dir, tmp_path / "mft", eval_dataset=eval_data, **CONSTANT)
    sft = testing_utils.make_trainer(
        FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path / "sft", eval_dataset=eval_data, **MFT_ARGS
    )
    state = mft.mft_generator.get_state()
    assert mft.evaluate()["eval_loss"] == pytest.approx(sft.evaluate()["eval_loss"], abs=1e-9)
    assert torch.equal(mft.mft_generator.get_state(), state)
    checkpointed_with_evaluation(partial(make_trainer, tiny_model_dir, **CONSTANT), tmp_path / "busy")


def _equal_length_conversations():
    """Conversations of at least 26 tokens, all cut to 24 by `max_length=24` (each keeps assistant tokens): batches
    without padding, whose random draws concatenate across micro-batches."""
    return tiny_conversational_dataset(48)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "two-workers"])
def test_schedule_per_optimizer_step_and_gradient_accumulation(tiny_model_dir, tmp_path, workers):
    """The linear schedule gives every micro-batch of a step that step's p_t (also with data-loader workers, whose
    copies of the trainer would go stale): one batch of four sequences per step equals four accumulated batches of
    one, and the logged rates are the schedule's."""
    runs = []
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer = testing_utils.make_trainer(
            RecordingMFTTrainer,
            MFTConfig,
            tiny_model_dir,
            tmp_path / f"{batch}x{accumulation}",
            _equal_length_conversations(),
            **{
                **MFT_ARGS,
                "mask_rate": 0.6,
                "max_steps": 4,
                "max_length": 24,
                "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "dataloader_num_workers": workers,
            },
        )
        trainer.train()
        runs.append(trainer)
    assert all(clean.shape[1] == 24 for clean, _, _ in runs[1].recorded)  # no padding, so the draws concatenate
    expected_rates = [scheduled_mask_rate(t, 4, 0.6) for t in range(4)]
    for trainer in runs:
        assert logged(trainer, "mft/mask_rate") == pytest.approx(expected_rates)
    assert torch.equal(torch.cat([m for _, m, _ in runs[0].recorded]), torch.cat([m for _, m, _ in runs[1].recorded]))
    assert logged(runs[1]) == pytest.approx(logged(runs[0]), abs=1e-6)
    assert_same_parameters(runs[0], runs[1])


def test_resume_continues_the_masking_stream(tiny_model_dir, tmp_path):
    # the linear ramp from p = 0 over 4 steps, steep (p_max 0.9) so that steps 3 and 4 mask much
    settings = dict(max_steps=4, mask_rate=0.9, learning_rate=2e-2, mask_token="pad", replace_rate=0.5)
    make = partial(make_trainer, tiny_model_dir, **settings)
    full, resumed, checkpoint = uninterrupted_and_resumed(make, tmp_path)
    assert os.path.isfile(os.path.join(checkpoint, "mft_rng_state.pth"))
    assert len(logged(resumed)) == 4
    assert logged(resumed)[2:] == pytest.approx(logged(full)[2:], abs=1e-9)
    assert logged(resumed, "mft/mask_rate") == pytest.approx(logged(full, "mft/mask_rate"))
    assert logged(resumed, "mft/masked_fraction") == logged(full, "mft/masked_fraction")

    # without the saved masking state the resumed run masks other positions and its losses differ
    stateless = tmp_path / "stateless" / "checkpoint-2"
    shutil.copytree(checkpoint, stateless)
    (stateless / "mft_rng_state.pth").unlink()
    other = make(tmp_path / "stateless", save_strategy="steps", save_steps=2)
    other.train(resume_from_checkpoint=str(stateless))
    assert logged(other)[2:] != pytest.approx(logged(full)[2:], abs=1e-6)


def test_mask_token_variant_trains_its_row(tiny_model_dir, tmp_path):
    """`mask_token="mask"` adds `<mask>` (mean rows) and trains its input row; the saved tokenizer and model have it."""
    trainer = make_trainer(tiny_model_dir, tmp_path, **{**CONSTANT, "mask_token": "mask", "replace_rate": 0.0})
    tokenizer = trainer.processing_class
    token_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    model = trainer.model
    assert trainer._mask_token_id == token_id == model.get_input_embeddings().weight.shape[0] - 1
    before = model.get_input_embeddings().weight[token_id].clone()
    trainer.train()
    assert not torch.equal(model.get_input_embeddings().weight[token_id], before)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(tmp_path / "saved"))


def test_lora_with_pad_and_random_tokens_trains_only_adapters(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=tiny_lora_config(), learning_rate=5e-2, **CONSTANT)
    changed = train_and_list_changed_parameters(trainer)
    assert changed and all("lora_" in name for name in changed), sorted(changed)
    assert logged(trainer, "mft/masked_fraction")[-1] > 0


def test_lora_refuses_a_new_mask_token(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="mask_token pad"):
        make_trainer(tiny_model_dir, tmp_path, peft_config=tiny_lora_config(), replace_rate=0.5, mask_token="mask")


def test_with_uds(tiny_model_dir, tmp_path):
    trainer = testing_utils.make_trainer(
        with_uds(MFTTrainer),
        with_uds(MFTConfig),
        tiny_model_dir,
        tmp_path,
        **MFT_ARGS,
        **CONSTANT,
        per_device_train_batch_size=4,
        uds_keep=2,
    )
    trainer.train()
    assert logged(trainer, "uds/selected_fraction") == pytest.approx([0.5] * 3)
    assert logged(trainer, "mft/mask_rate") == [0.5] * 3 and all(math.isfinite(x) for x in logged(trainer))


def test_ranks_mask_different_positions(tiny_model_dir, tmp_path, monkeypatch):
    """Each process seeds the masking generator with the seed plus its index: rank 1 masks other positions than rank
    0 from the same seed, and the same rank the same ones."""
    labels = response_labels(testing_utils.gen(4), batch=8)
    masks = []
    for rank in (0, 1, 0):
        monkeypatch.setattr(MFTConfig, "process_index", property(lambda self, rank=rank: rank))
        trainer = make_trainer(tiny_model_dir, tmp_path / str(len(masks)), max_steps=1)
        masks.append(sample_masked_positions(labels, 0.5, draw_mask_uniforms(labels, trainer.mft_generator)))
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_config_from_the_command_line(tmp_path):
    parser = HfArgumentParser(MFTConfig)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    (config,) = parser.parse_args_into_dataclasses(base)
    assert (config.mask_rate, config.mask_rate_schedule, config.mask_rate_warmup_ratio) == (0.4, "linear", 2 / 3)
    assert (config.replace_rate, config.mask_token, config.mft_seed) == (1.0, "mask", None)
    (config,) = parser.parse_args_into_dataclasses(
        [*base, "--mask_rate", "0.2", "--mask_rate_schedule", "constant", "--replace_rate", "0", "--mask_token", "pad"]
    )
    assert (config.mask_rate, config.mask_rate_schedule, config.replace_rate, config.mask_token) == (
        0.2,
        "constant",
        0.0,
        "pad",
    )


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mask_rate=1.0), "mask_rate"),
        (dict(mask_rate=-0.1), "mask_rate"),
        (dict(mask_rate=float("nan")), "mask_rate"),
        (dict(mask_rate_schedule="cosine"), "mask_rate_schedule"),
        (dict(mask_rate_warmup_ratio=0.0), "mask_rate_warmup_ratio"),
        (dict(mask_rate_warmup_ratio=1.5), "mask_rate_warmup_ratio"),
        (dict(replace_rate=1.5), "replace_rate"),
        (dict(mask_token="unk"), "mask_token"),
        (dict(mft_seed=1.5), "mft_seed"),
    ],
)
def test_bad_config_values_raise(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"`{field}=") as error:
        MFTConfig(output_dir=str(tmp_path), **{**MFT_ARGS, **overrides})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "flags, needle",
    [(["--mask_rate", "1.0"], "mask_rate"), (["--use_peft", "True", "--replace_rate", "0"], "--mask_token pad")],
    ids=["mask-rate", "peft-with-new-token"],
)
def test_command_line_refuses_bad_input_before_loading(capsys, tmp_path, flags, needle):
    # a model folder that cannot load: the refusal must come before any loading
    model = tmp_path / "unloadable-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "not-a-model-type-loading-this-would-fail"}')
    data = tmp_path / "data"
    tiny_conversational_dataset(4).save_to_disk(str(data))
    capsys.readouterr()  # the saving's progress bars
    code, _, err = run_cli(capsys, "mft", *paths(model, data, tmp_path / "out"), *CPU_FLAGS, *flags)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hf-plugins mft") and needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_plain_sft_config_gets_mft_defaults(tiny_model_dir, tmp_path):
    trainer = testing_utils.make_trainer(
        MFTTrainer, SFTConfig, tiny_model_dir, tmp_path, max_steps=1, assistant_only_loss=True, learning_rate=1e-3
    )
    assert isinstance(trainer.args, MFTConfig) and trainer.args.mask_rate == 0.4
    assert trainer.args.learning_rate == 1e-3
