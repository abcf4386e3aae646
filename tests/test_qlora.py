"""QLoRA: a 4-bit base model (bitsandbytes, whose CPU backend runs these tests) with LoRA adapters trains through the
fused trainers as it trains through TRL's `SFTTrainer`, given as TRL takes it (`quantization_config=`, as
`--load_in_4bit` passes it), and ASFT uses the adapters-off 4-bit model as its reference."""

import math

import pytest
import torch
from testing_utils import logged as logged_values
from testing_utils import tiny_lora_config
from transformers import AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from hf_plugins import ASFTConfig, ASFTTrainer, FusedSFTConfig, FusedSFTTrainer
from hf_plugins.testing import CPU_TRAINING_ARGS, tiny_conversational_dataset


bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'hf-plugins[qlora]'")

STEPS = 3


def four_bit():
    # float32 compute: the tiny model's numbers stay comparable between the stock and the fused loss
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def make_trainer(trainer_cls, config_cls, model_dir, tmp_path, **overrides):
    args = {
        **CPU_TRAINING_ARGS,
        "output_dir": str(tmp_path / trainer_cls.__name__),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-2,
        "model_init_kwargs": {"dtype": torch.float32},
        **overrides,
    }
    return trainer_cls(
        model=model_dir,
        args=config_cls(**args),
        train_dataset=tiny_conversational_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=tiny_lora_config(),
        quantization_config=four_bit(),
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_qlora_trained(trainer, before: dict[str, torch.Tensor]):
    """The base linears are 4-bit and untouched, the adapters (only they) moved, every logged loss is finite."""
    model = trainer.model
    assert model.is_loaded_in_4bit
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) >= 4  # q_proj, v_proj in each layer
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable, changed - trainable
    losses = logged_values(trainer)
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses


def test_fused_sft_trainer_matches_stock_sft_trainer_on_a_4bit_model(tiny_model_dir, tmp_path):
    stock = make_trainer(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path)
    fused = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path)
    before = snapshot(fused.model)
    stock.train()
    fused.train()
    assert_qlora_trained(fused, before)
    # same 4-bit weights, same adapters (seeded), same batches: the same losses step by step, and the adapters went the
    # same way (the LoRA weights are bf16, as TRL casts them for QLoRA: compare at bf16's resolution)
    assert logged_values(fused) == pytest.approx(logged_values(stock), rel=1e-4)
    stock_weights = dict(stock.model.named_parameters())
    for name, p in fused.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.float(), stock_weights[name].float(), rtol=2e-2, atol=2e-3)


def test_asft_uses_the_adapters_off_4bit_model_as_its_reference(tiny_model_dir, tmp_path):
    trainer = make_trainer(ASFTTrainer, ASFTConfig, tiny_model_dir, tmp_path)
    assert trainer.ref_model is None  # the adapters-off policy: no second model
    before = snapshot(trainer.model)
    trainer.train()
    assert_qlora_trained(trainer, before)
    kl = logged_values(trainer, "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # scored before any update: policy == the adapters-off model
    assert all(value > 0 for value in kl[1:]), kl
