"""LfU (Learning-from-the-Undesirable): `LfUTrainer` against a float64 reference of the official algorithm.

The reference below is written from the official trainer (`Lfu_consistency_asc_rep`) with the model's own forward
(materialised logits, `output_hidden_states`) and `torch.func.functional_call`: the ascent gradient of the
SFT loss on B_B, the perturbation `alpha * g / ||g||`, the mean over the layers of the per-layer MSE between the
perturbed and the detached clean hidden states at `labels != -100`, and one SGD step on `L_SFT + lambda * L_cons`.
The tiny model is float64, so the trainer (fused head, in-place perturbation) must agree to ~1e-10.
"""

import math
import os
from functools import partial

import pytest
import testing_utils
import torch
import torch.nn.functional as F
from testing_utils import (
    CLI_LORA_DROPOUT,
    IGNORE,
    assert_same_parameters,
    checkpointed_with_evaluation,
    logged,
    tiny_lora_config,
    uninterrupted_and_resumed,
)
from transformers import AutoModelForCausalLM

from hf_plugins import FusedSFTConfig, FusedSFTTrainer, LfUConfig, LfUTrainer
from hf_plugins.testing import tiny_conversational_dataset
from hf_plugins.trainers.lfu_trainer import SecondBatchStream


LFU_ARGS = dict(assistant_only_loss=True, per_device_train_batch_size=2)
make_trainer = partial(testing_utils.make_trainer, LfUTrainer, LfUConfig, **LFU_ARGS)
make_sft_trainer = partial(testing_utils.make_trainer, FusedSFTTrainer, FusedSFTConfig, **LFU_ARGS)


class RecordingLfUTrainer(LfUTrainer):
    """`LfUTrainer` that keeps the batches it trained on (B_A) and drew for the ascent (B_B), for the reference."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_a, self.seen_b = [], []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self.seen_a.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _second_batch(self):
        batch = super()._second_batch()
        self.seen_b.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
        return batch


def reference_step(model, params, batch_a, batch_b, alpha, lam, layers, lr):
    """One LfU step of the official algorithm in float64: returns the new trainable parameters, L_cons and ||g||."""
    names = list(params)

    def forward(values, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        out = torch.func.functional_call(model, values, (), {**inputs, "output_hidden_states": True})
        # The mean NLL of the next tokens, in float64 (the model's own loss upcasts to float32 only)
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        return loss, out.hidden_states

    theta = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    loss_b, _ = forward(theta, batch_b)
    g = torch.autograd.grad(loss_b, [theta[n] for n in names], allow_unused=True)
    g = [torch.zeros_like(theta[n]) if gi is None else gi for n, gi in zip(names, g)]
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    delta = {n: alpha * gi / norm for n, gi in zip(names, g)}

    loss_a, clean = forward(theta, batch_a)
    _, perturbed = forward({n: theta[n] + delta[n] for n in names}, batch_a)
    mask = batch_a["labels"] != IGNORE
    cons = torch.stack([F.mse_loss(perturbed[i][mask], clean[i][mask].detach()) for i in layers]).mean()
    grads = torch.autograd.grad(loss_a + lam * cons, [theta[n] for n in names], allow_unused=True)
    new = {n: theta[n].detach() - lr * (0 if gr is None else gr) for n, gr in zip(names, grads)}
    return new, cons.item(), norm.item()


STEP = dict(max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lfu_alpha=0.3, lfu_lambda=50.0)


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_one_step_equals_float64_reference_of_the_official_algorithm(tiny_model_dir, tmp_path, adapter):
    layers = [0, 1, 2] if not adapter else [1, 2]  # full: all states (the default); LoRA: a subset
    peft_config = tiny_lora_config(target_modules=["q_proj", "v_proj", "down_proj"]) if adapter else None
    trainer = testing_utils.make_trainer(
        RecordingLfUTrainer,
        LfUConfig,
        tiny_model_dir,
        tmp_path,
        dataset=tiny_conversational_dataset(8),
        peft_config=peft_config,
        init_seed=0,
        lfu_layers=None if not adapter else layers,
        **LFU_ARGS,
        **STEP,
    )
    if adapter:  # a fresh adapter is the base model exactly: move it off zero, so that every LoRA factor trains
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    reference_model = trainer.model if adapter else AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    (batch_a,), (batch_b,) = trainer.seen_a, trainer.seen_b
    assert not torch.equal(batch_a["input_ids"], batch_b["input_ids"])  # an independent minibatch
    # The recorded batches are replayed on the starting parameters (the reference never reads the trainer's state)
    if adapter:
        trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        reference_model.train()
    expected, cons, norm = reference_step(
        reference_model,
        initial,
        batch_a,
        batch_b,
        STEP["lfu_alpha"],
        STEP["lfu_lambda"],
        layers,
        STEP["learning_rate"],
    )
    assert logged(trainer, "ascent_grad_norm")[0] == pytest.approx(norm, rel=1e-9)
    assert logged(trainer, "consistency_loss")[0] == pytest.approx(cons, rel=1e-8)
    assert cons > 0
    actual = trained if adapter else {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-9, atol=1e-11, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved == len(expected)  # every trainable tensor moved (so each was compared after a real update)
    # The regulariser matters at these settings: the SFT-only update is elsewhere
    sft_only, _, _ = reference_step(reference_model, initial, batch_a, batch_b, STEP["lfu_alpha"], 0.0, layers, 0.5)
    assert max((sft_only[n] - expected[n]).abs().max().item() for n in expected) > 1e-6


def test_parameters_after_the_step_hold_no_trace_of_the_perturbation(tiny_model_dir, tmp_path):
    """With a learning rate of 0 the parameters after two LfU steps are the starting ones, bit for bit."""
    trainer = make_trainer(tiny_model_dir, tmp_path, **{**STEP, "max_steps": 2, "learning_rate": 0.0})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(c > 0 for c in logged(trainer, "consistency_loss"))  # the perturbation did happen


def test_lambda_zero_is_fused_sft(tiny_model_dir, tmp_path):
    lfu = make_trainer(tiny_model_dir, tmp_path / "lfu", lfu_lambda=0.0, max_steps=2)
    lfu.train()
    sft = make_sft_trainer(tiny_model_dir, tmp_path / "sft", max_steps=2)
    sft.train()
    assert logged(lfu) == logged(sft)
    assert_same_parameters(sft, lfu, atol=0, rtol=0)
    assert lfu.second_batches.draws == 0  # no ascent minibatch drawn, no extra forward


def test_vanishing_alpha_is_fused_sft_under_gradient_accumulation_and_lora(tiny_model_dir, tmp_path):
    """alpha -> 0 runs every part of the step (B_B's gradient, the perturbed forward, the restore) and must give
    FusedSFT's steps: nothing of B_B's gradient reaches the update, on any micro-batch of an accumulated step."""
    # Plain SGD: Adam would blow the O(alpha) gradient on a fresh adapter's lora_A (0 from SFT) up to full steps
    common = dict(max_steps=2, gradient_accumulation_steps=2, peft_config=tiny_lora_config(), init_seed=0, optim="sgd")
    lfu = make_trainer(tiny_model_dir, tmp_path / "lfu", lfu_alpha=1e-9, **common)
    lfu.train()
    sft = make_sft_trainer(tiny_model_dir, tmp_path / "sft", **common)
    sft.train()
    assert lfu.second_batches.draws == 4  # one ascent minibatch per micro-batch
    assert logged(lfu) == pytest.approx(logged(sft), rel=1e-10)
    assert_same_parameters(sft, lfu, atol=1e-10, rtol=0)  # a leak of B_B's gradient would show at ~1e-4
    assert all(g > 0 for g in logged(lfu, "ascent_grad_norm"))


@pytest.mark.parametrize("lora_dropout", [0.0, CLI_LORA_DROPOUT])
def test_resume_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, lora_dropout):
    """The B_B stream's position travels with the checkpoint (with LoRA dropout, every forward's masks continue
    from the checkpoint's RNG state too)."""

    def make(output_dir, **overrides):
        peft_config = tiny_lora_config(lora_dropout=lora_dropout)
        return make_trainer(tiny_model_dir, output_dir, max_steps=4, peft_config=peft_config, init_seed=0, **overrides)

    full, resumed, checkpoint = uninterrupted_and_resumed(make, tmp_path)
    assert torch.load(os.path.join(checkpoint, "lfu_state.pt"), weights_only=True)["draws"] == 2
    assert logged(resumed)[-2:] == pytest.approx(logged(full)[2:], abs=1e-12)
    assert logged(resumed, "consistency_loss")[-2:] == pytest.approx(logged(full, "consistency_loss")[2:], rel=1e-9)
    assert resumed.second_batches.draws == full.second_batches.draws == 4


def test_gradient_checkpointing_and_evaluation_leave_the_training_losses_unchanged(tiny_model_dir, tmp_path):
    """Under (non-reentrant) checkpointing the perturbed layers are recomputed while the parameters are perturbed."""
    busy = checkpointed_with_evaluation(partial(make_trainer, tiny_model_dir, max_steps=2), tmp_path)
    assert len(logged(busy, "consistency_loss")) == 2


def test_second_batch_stream_is_seeded_sharded_and_restorable():
    one = SecondBatchStream(10, batch_size=4, seed=3)
    draws = [one.next_indices() for _ in range(5)]  # two passes over 10 examples
    flat = sum(draws, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per pass
    assert SecondBatchStream(10, 4, seed=4).next_indices() != draws[0]
    ranks = [SecondBatchStream(10, 2, seed=3, world_size=2, rank=r) for r in (0, 1)]
    assert [ranks[0].next_indices() + ranks[1].next_indices() for _ in range(5)] == draws
    restored = SecondBatchStream(10, 4, seed=3)
    restored.load_state_dict({**one.state_dict(), "draws": 2})
    assert [restored.next_indices() for _ in range(3)] == draws[2:]


def test_evaluation_is_plain_sft(tiny_model_dir, tmp_path):
    eval_dataset = tiny_conversational_dataset(4, seed=1)
    lfu = make_trainer(tiny_model_dir, tmp_path / "lfu", eval_dataset=eval_dataset)
    sft = make_sft_trainer(tiny_model_dir, tmp_path / "sft", eval_dataset=eval_dataset)
    assert lfu.evaluate()["eval_loss"] == pytest.approx(sft.evaluate()["eval_loss"], rel=1e-12)
    assert lfu.second_batches.draws == 0


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (dict(lfu_alpha=0.0), ["`lfu_alpha=0.0`", "> 0"]),
        (dict(lfu_alpha=-0.1), ["`lfu_alpha=-0.1`", "lfu_lambda=0"]),
        (dict(lfu_alpha=math.inf), ["`lfu_alpha=inf`"]),
        (dict(lfu_lambda=-1.0), ["`lfu_lambda=-1.0`", ">= 0"]),
        (dict(lfu_layers=[]), ["`lfu_layers=[]`", "non-empty"]),
        (dict(lfu_layers=[0, -1]), ["`lfu_layers=[0, -1]`", "negative"]),
        (dict(lfu_layers=[1, 1]), ["distinct"]),
        (dict(lfu_seed=1.5), ["`lfu_seed=1.5`"]),
        (dict(fsdp="full_shard"), ["`fsdp=", "DDP"]),
        (
            dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
            ["use_reentrant", "False"],
        ),
    ],
)
def test_bad_settings_raise_one_line(tiny_model_dir, tmp_path, overrides, needles):
    with pytest.raises(ValueError) as error:
        make_trainer(tiny_model_dir, tmp_path, **overrides)
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_unknown_layer_index_is_refused_before_training(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`lfu_layers=\[0, 3\]` names hidden state\(s\) \[3\].*0, the embedding"):
        make_trainer(tiny_model_dir, tmp_path, lfu_layers=[0, 3])  # the tiny model has 2 layers: states 0, 1, 2


def test_streamed_dataset_is_refused(tiny_model_dir, tmp_path):
    streamed = tiny_conversational_dataset(8).to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style `train_dataset`"):
        make_trainer(tiny_model_dir, tmp_path, dataset=streamed)
