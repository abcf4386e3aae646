"""UDS online batch selection: hidden-state scores against the reference computation on materialised logits, the
selection and its FIFO memory, loss normalisation of the selected subset, checkpoints, and the trainers end to end.
"""

import math
import os
import shutil
from functools import partial

import pytest
import testing_utils
import torch
from testing_utils import (
    CLI_LORA_DROPOUT,
    CPU_ARGS,
    F64,
    assert_same_parameters,
    checkpointed_with_evaluation,
    gen,
    logged,
    tiny_lora_config,
    train_and_list_changed_parameters,
    uninterrupted_and_resumed,
)
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from hf_plugins import ASFTTrainer, FusedSFTConfig, FusedSFTTrainer, UDSCallback, UDSConfig, UDSMixin, with_uds
from hf_plugins.callbacks.uds import SketchMemory, UDSSettings
from hf_plugins.losses.uds import (
    SketchConstants,
    head_factors,
    nuclear_norms_from_logits,
    scores_from_hidden,
    scores_from_hidden_softcapped,
    sketches_from_logits,
)
from hf_plugins.modeling import logit_transform
from hf_plugins.testing import LOGIT_TRANSFORM_ARCHS, save_tiny_model, tiny_conversational_dataset


# ---------------------------------------------------------------------------------------------------------- helpers


def make_head(V=300, D=16, bias=True, seed=0, dtype=F64):
    g = gen(seed)
    weight = (torch.randn(V, D, generator=g, dtype=F64) / D**0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    return weight, b


def padded_mask(lengths, n, side="right"):
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, n - length :] = 1
    return mask


def reference_logits(hidden, weight, bias, mask, mask_padding, transform=None):
    """The logits the reference scores: every row of the padded batch, or (mask_padding) each example's own rows,
    moved to the front and zero-padded."""
    logits = hidden @ weight.T + (bias if bias is not None else 0.0)
    if transform is not None:
        logits = transform(logits)
    if not mask_padding:
        return logits
    out = torch.zeros_like(logits)
    for row in range(logits.shape[0]):
        own = logits[row][mask[row].bool()]
        out[row, : own.shape[0]] = own
    return out


CASES = {
    "N<D": dict(N=12, lengths=[12, 7, 3, 9]),
    "N>D": dict(N=40, lengths=[40, 25, 31, 18]),
}


# ------------------------------------------------------------------------------- scores == reference on logits


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mask_padding", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hidden_state_scores_equal_svdvals_and_fft_sketch_float64(case, bias, mask_padding, side):
    V, D, T = 300, 16, 64
    weight, b = make_head(V, D, bias)
    hidden = torch.randn(4, case["N"], D, generator=gen(1), dtype=F64)
    mask = padded_mask(case["lengths"], case["N"], side)
    constants = SketchConstants.draw(T, V, 4, 16, gen(2))

    utility, sketch = scores_from_hidden(
        hidden, head_factors(weight, b, constants, F64), constants, mask, mask_padding
    )

    logits = reference_logits(hidden, weight, b, mask, mask_padding)
    expected_utility = nuclear_norms_from_logits(logits)
    expected_sketch = sketches_from_logits(logits, constants)
    assert utility.dtype == F64 and sketch.shape == (4, 4 * 16)
    torch.testing.assert_close(utility, expected_utility, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sketch, expected_sketch, rtol=1e-9, atol=1e-8)
    # nothing trivially zero, and the examples differ
    assert (utility > 1).all() and sketch.std(0).min() > 1e-3


def test_reference_sketch_is_the_documented_bilinear_form():
    """The FFT sketch equals sqrt(T/r1) sqrt(V/r2) (C_T diag(d1))[idx1] Lpad (diag(d2) C_V)[:, idx2] with explicit
    cosine matrices: the reference computation is the formula."""
    V, T, N = 50, 16, 10
    constants = SketchConstants.draw(T, V, 3, 5, gen(0))
    logits = torch.randn(2, N, V, generator=gen(1), dtype=F64)
    t, v = torch.arange(T, dtype=F64), torch.arange(V, dtype=F64)
    c_t = torch.cos(2 * math.pi * t[:, None] * t[None, :] / T) * constants.d1.to(F64)
    c_v = torch.cos(2 * math.pi * v[:, None] * v[None, :] / V) * constants.d2.to(F64)[:, None]
    padded = torch.zeros(2, T, V, dtype=F64)
    padded[:, :N] = logits
    explicit = c_t[constants.idx1] @ padded @ c_v[:, constants.idx2] * math.sqrt(T / 3 * V / 5)
    torch.testing.assert_close(sketches_from_logits(logits, constants), explicit.reshape(2, -1), rtol=1e-9, atol=1e-9)


def test_float32_scores_match_float64():
    weight, b = make_head(bias=True)
    hidden = torch.randn(3, 20, 16, generator=gen(3), dtype=F64)
    mask = padded_mask([20, 11, 5], 20)
    constants = SketchConstants.draw(32, 300, 8, 16, gen(4))
    u64, s64 = scores_from_hidden(hidden, head_factors(weight, b, constants, F64), constants, mask)
    u32, s32 = scores_from_hidden(
        hidden.float(), head_factors(weight.float(), b.float(), constants, torch.float32), constants, mask
    )
    torch.testing.assert_close(u32, u64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=1e-3)


def test_singular_head_gram_falls_back_to_eigh():
    """V < D: W^T W is singular, the Cholesky fails and the eigendecomposition factor is used; still exact."""
    weight, b = make_head(V=10, D=16, bias=False)
    hidden = torch.randn(2, 6, 16, generator=gen(5), dtype=F64)
    constants = SketchConstants.draw(8, 10, 2, 4, gen(6))
    utility, sketch = scores_from_hidden(hidden, head_factors(weight, b, constants, F64), constants, None)
    logits = hidden @ weight.T
    torch.testing.assert_close(utility, nuclear_norms_from_logits(logits), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sketch, sketches_from_logits(logits, constants), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 0.7], ids=["cap", "scale+cap"])
@pytest.mark.parametrize("mask_padding", [True, False], ids=["masked", "unmasked"])
def test_softcapped_head_scored_from_logit_tiles(mask_padding, scale, monkeypatch):
    """A soft-capped head is not linear in the hidden states: the tiled fallback equals the reference on the capped
    logits (tiles of a few vocabulary rows, so several tiles are combined), the model's scale applied before the
    cap."""
    from hf_plugins.losses import uds

    monkeypatch.setattr(uds, "_TILE_ELEMENTS", 4 * 12 * 7)  # 7 vocabulary rows per tile
    weight, b = make_head(V=60, D=8, bias=True)
    hidden = 3 * torch.randn(4, 12, 8, generator=gen(7), dtype=F64)
    mask = padded_mask([12, 4, 9, 1], 12)
    constants = SketchConstants.draw(16, 60, 4, 8, gen(8))
    cap = 1.5
    utility, sketch = scores_from_hidden_softcapped(hidden, weight, b, cap, constants, mask, mask_padding, F64, scale)
    logits = reference_logits(hidden, weight, b, mask, mask_padding, lambda z: cap * torch.tanh(scale * z / cap))
    torch.testing.assert_close(utility, nuclear_norms_from_logits(logits), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sketch, sketches_from_logits(logits, constants), rtol=1e-9, atol=1e-9)
    # and the cap matters: the linear shortcut would give other values
    linear, _ = scores_from_hidden(hidden, head_factors(weight, b, constants, F64), constants, mask, mask_padding)
    assert not torch.allclose(linear, utility, rtol=1e-3)


def test_padding_masked_scores_do_not_depend_on_the_batch_but_unmasked_do():
    weight, b = make_head(bias=True)
    constants = SketchConstants.draw(32, 300, 4, 8, gen(9))
    factors = head_factors(weight, b, constants, F64)
    alone = torch.randn(1, 10, 16, generator=gen(10), dtype=F64)
    batch = torch.randn(2, 25, 16, generator=gen(11), dtype=F64)
    batch[0, :10] = alone[0]  # the example, then 15 rows of padding (whatever the backbone put there)
    mask = padded_mask([10, 25], 25)
    for mask_padding in (True, False):
        u_alone, s_alone = scores_from_hidden(alone, factors, constants, None, mask_padding)
        u_batch, s_batch = scores_from_hidden(batch, factors, constants, mask, mask_padding)
        # (the Gram matrices' zero eigenvalues come out as +-1e-16 relative, whose square roots add ~1e-8 each)
        same = torch.allclose(u_batch[0], u_alone[0], rtol=1e-7) and torch.allclose(s_batch[0], s_alone[0], rtol=1e-9)
        assert same == mask_padding


def test_sequence_longer_than_the_sketch_is_refused():
    weight, b = make_head()
    constants = SketchConstants.draw(8, 300, 2, 4, gen(0))
    with pytest.raises(ValueError, match="uds_sketch_length"):
        scores_from_hidden(torch.randn(1, 9, 16, dtype=F64), head_factors(weight, b, constants, F64), constants)


# ------------------------------------------------------------------------------------------ memory and selection


def test_memory_is_fifo_with_wrap_around():
    memory = SketchMemory(capacity=5, dim=2)
    rows = torch.arange(1, 25, dtype=torch.float32).reshape(12, 2)  # row i = [2i+1, 2i+2]
    memory.push(rows[:3])
    assert (memory.pointer, memory.count) == (3, 3)
    assert torch.equal(memory.contents(), rows[:3])
    memory.push(rows[3:7])  # wraps: rows 5 and 6 overwrite slots 0 and 1 (rows 0 and 1, the oldest)
    assert (memory.pointer, memory.count) == (2, 5)
    assert torch.equal(memory.contents(), rows[2:7])
    assert torch.equal(memory.buffer[:2], rows[5:7])
    memory.push(rows[7:])  # five rows at once: a whole turn of the ring
    assert (memory.pointer, memory.count) == (2, 5)
    assert torch.equal(memory.contents(), rows[7:])
    memory.push(torch.zeros(0, 2))
    assert (memory.pointer, memory.count) == (2, 5)
    # more rows than the capacity in one push: the newest five are kept, oldest first
    memory.push(torch.arange(14, dtype=torch.float32).reshape(7, 2))
    assert torch.equal(memory.contents(), torch.arange(4, 14, dtype=torch.float32).reshape(5, 2))


def test_memory_mean_distance():
    memory = SketchMemory(capacity=4, dim=3)
    queries = torch.randn(5, 3, generator=gen(0))
    assert torch.equal(memory.mean_distances(queries), torch.zeros(5, dtype=F64))  # empty: no diversity yet
    stored = torch.randn(3, 3, generator=gen(1))
    memory.push(stored)
    expected = torch.stack([(q.double() - stored.double()).norm(dim=1).mean() for q in queries])
    torch.testing.assert_close(memory.mean_distances(queries), expected, rtol=1e-12, atol=1e-12)


def attached_callback(**settings):
    callback = UDSCallback(**settings)
    callback.setup(vocab_size=300, sketch_length=32, device="cpu", seed=0)
    return callback


def test_selection_keeps_the_top_k_of_utility_plus_alpha_diversity():
    callback = attached_callback(keep=2, alpha=0.5, memory_size=8)
    utility = torch.tensor([1.0, 5.0, 3.0, 4.0], dtype=F64)
    diversity = torch.tensor([10.0, 0.0, 4.0, 1.0], dtype=F64)  # scores 6, 5, 5, 4.5
    sketch = torch.arange(4, dtype=torch.float32)[:, None].expand(4, 8 * 128).contiguous()
    selection = callback.select_from_scores(utility, diversity, sketch)
    assert selection.indices.tolist() == [0, 1] or selection.indices.tolist() == [0, 2]  # a tie between 1 and 2
    torch.testing.assert_close(selection.scores, utility + 0.5 * diversity)
    assert callback.memory.count == 2
    assert torch.equal(callback.memory.contents()[:, 0], selection.indices.float())
    # alpha = 0: utility alone
    plain = attached_callback(keep=2, alpha=0.0)
    assert plain.select_from_scores(utility, diversity, sketch).indices.tolist() == [1, 3]
    # a last batch smaller than keep is kept whole
    assert attached_callback(keep=3).select_from_scores(utility[:2], diversity[:2], sketch[:2]).indices.tolist() == [
        0,
        1,
    ]


def test_random_mode_is_seeded_and_touches_no_memory():
    first, second = attached_callback(keep=3, mode="random"), attached_callback(keep=3, mode="random")
    picks = [first.select_random(8).indices.tolist() for _ in range(4)]
    assert picks == [second.select_random(8).indices.tolist() for _ in range(4)]
    assert all(len(set(p)) == 3 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    other = UDSCallback(keep=3, mode="random")
    other.setup(300, 32, "cpu", process_index=1, seed=0)  # another process draws another stream
    assert [other.select_random(8).indices.tolist() for _ in range(4)] != picks
    assert first.memory.count == 0


# ------------------------------------------------------------------------------------------------- bad settings

UDS_ARGS = dict(CPU_ARGS, assistant_only_loss=True)
UDSFusedSFTConfig = with_uds(FusedSFTConfig)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(uds_keep=4), "uds_keep=4.*per_device_train_batch_size=4"),
        (dict(uds_keep=5), "uds_keep=5.*per_device_train_batch_size=4"),
        (dict(uds_keep=0), "uds_keep=0"),
        (dict(uds_alpha=-1.0), "uds_alpha"),
        (dict(uds_memory_size=0), "uds_memory_size"),
        (dict(uds_sketch_rows=0), "uds_sketch_rows"),
        (dict(uds_sketch_length=0), "uds_sketch_length"),
        (dict(uds_start_step=-1), "uds_start_step"),
        (dict(uds_mode="greedy"), "uds_mode"),
        (dict(packing=True), "packing=False"),
        (dict(padding_free=True), "padding_free=False"),
    ],
)
def test_bad_settings_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        UDSFusedSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **{**UDS_ARGS, **overrides})


def test_config_from_the_command_line(tmp_path):
    parser = HfArgumentParser(with_uds(FusedSFTConfig))
    base = [
        "--output_dir",
        str(tmp_path),
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "8",
    ]
    (config,) = parser.parse_args_into_dataclasses(base)
    assert (
        config.uds_keep,
        config.uds_alpha,
        config.uds_memory_size,
        config.uds_sketch_rows,
        config.uds_sketch_cols,
        config.uds_start_step,
        config.uds_mask_padding,
        config.uds_mode,
    ) == (1, 1.5e-3, 1024, 8, 128, 0, True, "uds")
    (config,) = parser.parse_args_into_dataclasses(
        [*base, "--uds_keep", "2", "--uds_alpha", "0.01", "--uds_mask_padding", "false", "--uds_mode", "random"]
    )
    assert (config.uds_keep, config.uds_alpha, config.uds_mask_padding, config.uds_mode) == (2, 0.01, False, "random")
    assert isinstance(config, UDSConfig) and isinstance(config, FusedSFTConfig)


def test_with_uds_classes():
    trainer_cls = with_uds(ASFTTrainer)
    assert issubclass(trainer_cls, UDSMixin) and issubclass(trainer_cls, ASFTTrainer)
    assert with_uds(ASFTTrainer) is trainer_cls and with_uds(trainer_cls) is trainer_cls
    assert issubclass(trainer_cls.config_class, UDSConfig)
    with pytest.raises(ValueError, match="trainer class or a config class"):
        with_uds(int)


@pytest.mark.parametrize("cls", [GRPOTrainer, Trainer, GRPOConfig, TrainingArguments])
def test_with_uds_refuses_non_sft_classes(cls):
    """A GRPO (or plain Trainer) UDS class would fail in its constructor (GRPOTrainer takes `reward_funcs` second)
    or train without the selection: refused when the class is made."""
    kind = "trainer" if issubclass(cls, Trainer) else "config"
    with pytest.raises(ValueError, match=rf"SFT {kind} class .*{cls.__name__} is not one"):
        with_uds(cls)


# -------------------------------------------------------------------------------------------------- the trainers


def make_trainer(model_dir, output_dir, trainer_cls=FusedSFTTrainer, **overrides):
    """`trainer_cls` with UDS, selecting from 4 candidates a micro-batch."""
    cls = with_uds(trainer_cls)
    config_cls = getattr(cls, "config_class", None) or with_uds(SFTConfig)
    return testing_utils.make_trainer(
        cls, config_cls, model_dir, output_dir, **{**UDS_ARGS, "per_device_train_batch_size": 4, **overrides}
    )


def record_subsets(trainer, summary=lambda batch: batch):
    """Wrap the trainer's subset step: the `summary` of every selected micro-batch, in selection order."""
    records = []
    original = trainer._uds_subset

    def subset(batch, indices):
        out = original(batch, indices)
        records.append(summary(out))
        return out

    trainer._uds_subset = subset
    return records


def record_selections(trainer):
    """Every selected micro-batch's examples (their unpadded token ids)."""

    def examples(out):
        return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(out["input_ids"], out["attention_mask"])]

    return record_subsets(trainer, examples)


@pytest.mark.parametrize("trainer_cls", [FusedSFTTrainer, ASFTTrainer, SFTTrainer], ids=["fused", "asft", "trl-sft"])
def test_trainer_trains_on_the_selected_examples(tiny_model_dir, tmp_path, trainer_cls):
    trainer = make_trainer(tiny_model_dir, tmp_path, trainer_cls, gradient_accumulation_steps=2)
    selections = record_selections(trainer)
    changed = train_and_list_changed_parameters(trainer)
    losses = logged(trainer)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert changed
    assert len(selections) == 6 and all(len(s) == 1 for s in selections)  # 1 of 4, two micro-batches per step
    assert logged(trainer, "uds/selected_fraction") == [0.25] * 3
    utilities, diversities = logged(trainer, "uds/utility"), logged(trainer, "uds/diversity")
    assert len(utilities) == 3 and all(u > 0 for u in utilities)
    # the memory starts empty (no diversity for the first micro-batch), then holds every selected sketch
    assert diversities[0] >= 0 and all(d > 0 for d in diversities[1:])
    assert trainer.uds_callback.memory.count == 6
    # the lm_head is trained: its factors are computed once per optimizer step, not once per micro-batch
    assert trainer.uds_callback.factor_computations == 3
    if trainer_cls is ASFTTrainer:
        assert len(logged(trainer, "kl")) == 3


def test_frozen_head_factors_computed_once_per_run(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=tiny_lora_config())
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer))
    assert trainer.uds_callback.factor_computations == 1


def test_hidden_state_scores_equal_the_models_materialised_logits(tiny_model_dir, tmp_path):
    """In the trainer, with a biased lm_head in float64: the scores of a real batch equal svdvals of the model's own
    logits and the FFT sketch of them (padding rows included: `uds_mask_padding=False`, the reference's scoring)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64)
    vocab, hidden_size = model.lm_head.weight.shape
    model.lm_head.bias = torch.nn.Parameter(torch.randn(vocab, generator=gen(0), dtype=F64))
    trainer = make_trainer(tiny_model_dir, tmp_path, model=model, uds_mask_padding=False)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    hidden, weight, bias = trainer._uds_hidden_states(batch)
    assert bias is not None and hidden.dtype == F64
    utility, _, sketch = trainer.uds_callback.score(hidden, weight, bias, batch["attention_mask"], 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    constants = trainer.uds_callback.constants
    torch.testing.assert_close(utility, nuclear_norms_from_logits(logits), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sketch, sketches_from_logits(logits, constants), rtol=1e-9, atol=1e-7)


def test_scoring_dropout_draws_from_its_own_saved_stream(tiny_model_dir, tmp_path):
    """With LoRA dropout the scoring forward draws masks (two scorings of a batch differ) from UDS's own stream: the
    global generator, which the training forward draws from, is left as it was, and the stream's saved state replays
    the same masks."""
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=tiny_lora_config(0.5))
    for name, p in trainer.model.named_parameters():  # non-zero adapters, so that their input's dropout shows
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0, generator=gen(0))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    callback = trainer.uds_callback
    global_state = torch.get_rng_state()
    saved = callback.state_dict()
    first = trainer._uds_hidden_states(batch)[0]
    second = trainer._uds_hidden_states(batch)[0]
    assert torch.equal(torch.get_rng_state(), global_state)
    assert not torch.allclose(first, second)
    callback.load_state_dict(saved)
    torch.testing.assert_close(trainer._uds_hidden_states(batch)[0], first, rtol=0, atol=0)
    # a checkpoint written before the stream was saved (version 1) still loads; the stream continues
    callback.load_state_dict({k: v for k, v in saved.items() if k != "scoring_stream"} | {"version": 1})


PROMPT_LEARNING = {
    "prompt-tuning": ("PromptTuningConfig", {}),
    "p-tuning": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "prefix-tuning": ("PrefixTuningConfig", {}),
}


@pytest.mark.parametrize("kind", PROMPT_LEARNING)
def test_prompt_learning_peft_scores_the_examples_own_positions(tiny_model_dir, tmp_path, kind):
    """Prompt tuning and p-tuning run 4 virtual tokens in front of each example, so the scoring forward returns 4
    more positions than the batch has: scored are the example's own (float64, against svdvals and the FFT sketch of
    the PEFT model's materialised logits there); prefix tuning changes no positions. Then UDS trains with each."""
    import peft

    name, extra = PROMPT_LEARNING[kind]
    peft_config = getattr(peft, name)(task_type="CAUSAL_LM", num_virtual_tokens=4, **extra)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64)
    trainer = make_trainer(tiny_model_dir, tmp_path, model=model, peft_config=peft_config, uds_mask_padding=False)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    length = batch["input_ids"].shape[1]
    hidden, weight, bias = trainer._uds_hidden_states(batch)
    assert hidden.shape[:2] == batch["input_ids"].shape and hidden.dtype == F64
    utility, _, sketch = trainer.uds_callback.score(hidden, weight, bias, batch["attention_mask"], 0)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == length + (0 if kind == "prefix-tuning" else 4)
    own = logits[:, -length:]
    torch.testing.assert_close(utility, nuclear_norms_from_logits(own), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sketch, sketches_from_logits(own, trainer.uds_callback.constants), rtol=1e-9, atol=1e-7)

    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=peft_config, max_steps=2)
    changed = train_and_list_changed_parameters(trainer)
    assert changed and all("prompt_encoder" in n or "prefix_encoder" in n for n in changed), changed
    assert all(math.isfinite(x) for x in logged(trainer) + logged(trainer, "uds/utility"))


def selected_example_indices(trainer, selections):
    """Row of the (tokenized) training set of every selected example, in selection order."""
    rows = {}
    for index, example in enumerate(trainer.train_dataset):
        rows.setdefault(tuple(example["input_ids"]), index)
    return [[rows[ids] for ids in micro_batch] for micro_batch in selections]


class InOrderFusedSFTTrainer(FusedSFTTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def test_gradient_accumulation_normalisation_equals_training_on_the_selected_examples_alone(tiny_model_dir, tmp_path):
    """2 of 4 candidates per micro-batch, 2 micro-batches per step: the loss is the token mean over the selected
    examples of the whole window (not over all candidates, which `num_items_in_batch` counts before selection), so
    the run equals plain training on the selected examples, fed in the same order, 2 per micro-batch."""
    dataset = tiny_conversational_dataset(32)
    uds = make_trainer(tiny_model_dir, tmp_path / "uds", dataset=dataset, gradient_accumulation_steps=2, uds_keep=2)
    selections = record_selections(uds)
    uds.train()
    order = [i for micro_batch in selected_example_indices(uds, selections) for i in micro_batch]
    assert len(order) == 12

    plain = testing_utils.make_trainer(
        InOrderFusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path / "plain",
        dataset.select(order),
        **UDS_ARGS,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    plain.train()
    assert logged(uds) == pytest.approx(logged(plain), rel=1e-5, abs=1e-6)
    assert_same_parameters(plain, uds, rtol=1e-4, atol=1e-6)
    # the candidates' token count would have given a smaller loss
    assert logged(uds)[0] > 0


@pytest.mark.parametrize("lora_dropout", [None, CLI_LORA_DROPOUT], ids=["full", "lora-dropout"])
@pytest.mark.parametrize("mode", ["uds", "random"])
def test_resume_selects_the_same_examples_and_gives_the_same_losses(tiny_model_dir, tmp_path, mode, lora_dropout):
    """With LoRA dropout the scoring forward draws dropout masks too: a resumed run must score with the masks of the
    uninterrupted run and leave the training forward's masks as they were."""
    # alpha = 1: the diversity term decides selections, so the memory's state shows in what is selected
    uds = dict(max_steps=4, uds_alpha=1.0, uds_mode=mode, uds_memory_size=5, gradient_accumulation_steps=2)

    selections = {}  # folder -> the selections of the last trainer made for it

    def make(output_dir, **overrides):
        peft_config = None if lora_dropout is None else tiny_lora_config(lora_dropout)
        trainer = make_trainer(tiny_model_dir, output_dir, peft_config=peft_config, **uds, **overrides)
        selections[output_dir.name] = record_selections(trainer)
        return trainer

    full, resumed, checkpoint = uninterrupted_and_resumed(make, tmp_path)
    assert os.path.isfile(os.path.join(checkpoint, "uds_state.pt"))
    assert selections["run"] == selections["full"][4:]  # micro-batches of steps 3 and 4
    assert logged(resumed)[2:] == pytest.approx(logged(full)[2:], abs=1e-6)
    if mode == "uds":
        assert full.uds_callback.memory.count == 5 and full.uds_callback.memory.pointer == 3  # wrapped around
        assert torch.equal(resumed.uds_callback.memory.buffer, full.uds_callback.memory.buffer)
        for key in ("uds/utility", "uds/diversity"):
            assert logged(resumed, key)[2:] == pytest.approx(logged(full, key)[2:], rel=1e-9)

    # without the saved state the resumed run starts from an empty memory (other diversities; on this tiny data the
    # utility term happens to pick the same examples) or a restarted random stream (other examples)
    stateless = tmp_path / "stateless" / "checkpoint-2"
    shutil.copytree(checkpoint, stateless)
    (stateless / "uds_state.pt").unlink()
    other = make(tmp_path / "stateless", save_strategy="steps", save_steps=2)
    other.train(resume_from_checkpoint=str(stateless))
    if mode == "uds":
        assert logged(other, "uds/diversity")[2:] != pytest.approx(logged(full, "uds/diversity")[2:], rel=1e-3)
    else:
        assert selections["stateless"] != selections["full"][4:]


def test_start_step_trains_on_every_candidate_before_it(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, uds_start_step=2)
    selections = record_selections(trainer)
    trainer.train()
    assert logged(trainer, "uds/selected_fraction") == [1.0, 1.0, 0.25]
    assert len(selections) == 1 and trainer.uds_callback.memory.count == 1


def test_gradient_checkpointing_and_evaluation(tiny_model_dir, tmp_path):
    busy = checkpointed_with_evaluation(partial(make_trainer, tiny_model_dir), tmp_path)
    assert len(logged(busy, "eval_loss")) == 3


# ----------------------------------------------------------------------------------------------- refused inputs


@pytest.mark.parametrize("arch", LOGIT_TRANSFORM_ARCHS)
@pytest.mark.parametrize("trainer_cls", [SFTTrainer, FusedSFTTrainer], ids=["trl", "fused"])
def test_models_that_transform_their_logits_are_scored_on_their_own_logits(tmp_path, arch, trainer_cls):
    """A soft-capped Gemma 2 (scored from logit tiles), a Cohere scaling by 0.0625 and a Granite dividing by 0.25
    (scored from the hidden-state factors, times the scale): UDS's scores equal svdvals and sketches of the model's
    own logits, with TRL's SFTTrainer and with FusedSFTTrainer, whose head applies the same transform."""
    model_dir = save_tiny_model(tmp_path / arch, arch=arch, dtype=F64)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = make_trainer(model_dir, tmp_path / "out", trainer_cls, model=model, uds_mask_padding=False)
    assert trainer._uds_logit_transform == logit_transform(model) and not trainer._uds_logit_transform.is_identity
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    hidden, weight, bias = trainer._uds_hidden_states(batch)
    utility, _, sketch = trainer.uds_callback.score(
        hidden, weight, bias, batch["attention_mask"], 0, trainer._uds_logit_transform
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # capped logits have many small singular values; each is read from a float64 Gram eigenvalue, to ~1e-8 sigma_max
    torch.testing.assert_close(utility, nuclear_norms_from_logits(logits), rtol=1e-6, atol=1e-9)
    expected_sketch = sketches_from_logits(logits, trainer.uds_callback.constants)
    torch.testing.assert_close(sketch, expected_sketch, rtol=1e-9, atol=1e-7)
    # the transform matters: the lm_head's plain output scores otherwise
    plain, _, _ = trainer.uds_callback.score(hidden, weight, bias, batch["attention_mask"], 0)
    assert not torch.allclose(plain, utility, rtol=1e-3)
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer))


def test_packed_batch_is_refused_at_run_time(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    packed = {"input_ids": torch.ones(1, 12, dtype=torch.long), "position_ids": torch.arange(12)[None] % 5}
    with pytest.raises(ValueError, match="packing=False"):
        trainer._uds_select([packed])


def test_batch_longer_than_the_sketch_is_refused(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, uds_sketch_length=8)
    with pytest.raises(ValueError, match="uds_sketch_length"):
        trainer.train()


def test_callback_without_the_trainer_hook_is_refused(tiny_model_dir, tmp_path):
    trainer = FusedSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=FusedSFTConfig(output_dir=str(tmp_path), max_steps=1, **UDS_ARGS),
        train_dataset=tiny_conversational_dataset(8),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        callbacks=[UDSCallback()],
    )
    with pytest.raises(ValueError, match="with_uds"):
        trainer.train()


def test_callback_settings_must_match_the_config(tiny_model_dir, tmp_path):
    cls = with_uds(FusedSFTTrainer)
    args = cls.config_class(output_dir=str(tmp_path), per_device_train_batch_size=4, **UDS_ARGS)
    common = dict(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=tiny_conversational_dataset(8),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    with pytest.raises(ValueError, match="keep=2.*uds_keep=1"):
        cls(**common, callbacks=[UDSCallback(UDSSettings(keep=2))])
    callback = UDSCallback.from_config(args)
    trainer = cls(**common, callbacks=[callback])
    assert trainer.uds_callback is callback and callback.trainer_attached


@pytest.mark.parametrize("method", ["poft", "tl", "otr"])
def test_method_trainers_with_extra_columns_select_them_with_the_examples(tiny_model_dir, tmp_path, method):
    """Per-example (PoFT's reference scores) and per-token (TL's token weights) columns are selected with their
    examples; OTR's sampling trains on the kept examples too."""
    from hf_plugins import OTRTrainer, PoFTTrainer, TLTrainer
    from hf_plugins.testing import TOOL_CHAT_TEMPLATE, tiny_tool_calling_dataset
    from hf_plugins.trainers.poft_trainer import REF_SCORE_COLUMN

    if method == "poft":
        dataset = tiny_conversational_dataset(32)
        dataset = dataset.add_column(REF_SCORE_COLUMN, [-3.0 - 0.01 * i for i in range(32)])
        trainer = make_trainer(tiny_model_dir, tmp_path, PoFTTrainer, dataset=dataset)
        column = REF_SCORE_COLUMN
    elif method == "tl":
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        tokenizer.chat_template = TOOL_CHAT_TEMPLATE
        trainer = make_trainer(
            tiny_model_dir, tmp_path, TLTrainer, dataset=tiny_tool_calling_dataset(16), tokenizer=tokenizer
        )
        column = "token_weights"
    else:
        trainer = make_trainer(tiny_model_dir, tmp_path, OTRTrainer)
        column = None
    batches = record_subsets(trainer)
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer)) and len(logged(trainer)) == 3
    assert logged(trainer, "uds/selected_fraction") == [0.25] * 3
    for batch in batches:
        assert batch["input_ids"].shape[0] == 1
        if column is not None:
            assert batch[column].shape[0] == 1
            if column == "token_weights":
                assert batch[column].shape == batch["input_ids"].shape
