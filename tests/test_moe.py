"""Mixture-of-Experts models: the router load-balancing loss of FusedSFTTrainer (and the trainers built on it)
against stock TRL SFTTrainer and the model's own forward, on tiny Qwen3-MoE and GPT-OSS models."""

import math
from functools import partial

import pytest
import testing_utils
import torch
from peft import LoraConfig
from testing_utils import assert_same_parameters, logged
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from hf_plugins import (
    ASFTConfig,
    ASFTTrainer,
    FusedSFTConfig,
    FusedSFTTrainer,
    OTRConfig,
    OTRTrainer,
    PoFTConfig,
    PoFTTrainer,
    TLConfig,
    TLTrainer,
    with_uds,
)
from hf_plugins.modeling import HiddenStateHead, LossHead, add_loss_head_forward
from hf_plugins.testing import (
    MOE_ARCHS,
    TOOL_CHAT_TEMPLATE,
    save_tiny_model,
    tiny_conversational_dataset,
    tiny_tool_calling_dataset,
)


# float32 results of two heads that reduce in different orders (any thread count), a few SGD steps apart
ATOL, RTOL = 1e-5, 1e-4
# Experts' weights are the LoRA targets of TRL's own MoE test (`test_train_moe_with_peft_config`)
EXPERT_LORA = dict(r=4, lora_alpha=8, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_model_dir(request, tmp_path_factory):
    """A tiny MoE causal LM (4 experts, 2 per token, as TRL's tiny MoE models) and its tokenizer, saved once."""
    return save_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


# Plain SGD, as in the dense comparison with stock: Adam would turn float noise into full-size steps. Seeded: the same
# LoRA initialisation in both trainers of a comparison.
make_trainer = partial(
    testing_utils.make_trainer, init_seed=0, optim="sgd", learning_rate=0.5, max_steps=4, per_device_train_batch_size=2
)


def train_stock_and_fused(model_dir, tmp_path, **overrides):
    trainers = []
    for trainer_cls, config_cls in ((SFTTrainer, SFTConfig), (FusedSFTTrainer, FusedSFTConfig)):
        trainer = make_trainer(trainer_cls, config_cls, model_dir, tmp_path / trainer_cls.__name__, **overrides)
        trainer.train()
        trainers.append(trainer)
    return trainers


def assert_same_training(stock, fused):
    assert logged(fused) == pytest.approx(logged(stock), abs=ATOL, rel=RTOL)
    assert len({round(x, 6) for x in logged(fused)}) > 1  # the losses move
    assert logged(fused, "aux_loss") == pytest.approx(logged(stock, "aux_loss"), abs=ATOL, rel=RTOL)
    assert_same_parameters(stock, fused, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------- the forward


def padded_and_padding_free_batches(tokenizer):
    """The same three conversations as a right-padded batch and as one padding-free row (no attention mask)."""
    rows = [
        tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]
        for m in tiny_conversational_dataset(3)["messages"]
    ]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    padded = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    packed_ids = torch.tensor([sum(rows, [])])
    position_ids = torch.tensor([sum((list(range(len(row))) for row in rows), [])])
    packed = {"input_ids": packed_ids, "position_ids": position_ids, "labels": packed_ids}
    return {"padded": padded, "padding_free": packed}


@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_aux_loss_is_the_one_the_models_own_forward_computes(moe_model_dir, layout):
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir)
    batch = padded_and_padding_free_batches(AutoTokenizer.from_pretrained(moe_model_dir))[layout]
    with torch.no_grad():
        expected = model(**batch, output_router_logits=True, use_cache=False).aux_loss
        add_loss_head_forward(model)
        fused = model(**batch, output_router_logits=True, loss_head=LossHead("sft"))
        # Off unless asked for, as in the model's own forward (the config's `output_router_logits` is False)
        off = model(**batch, loss_head=LossHead("sft"))
    torch.testing.assert_close(fused.aux_loss, expected, atol=1e-6, rtol=1e-6)
    assert off.aux_loss is None


def test_hidden_state_forwards_record_no_router_logits(moe_model_dir):
    """Reference and scoring forwards compute no loss: the backbone records no router logits for them, even when
    the config asks for router logits (as TRL sets it when the aux loss is on)."""
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir)
    model.config.output_router_logits = True
    add_loss_head_forward(model)
    recorded = []
    model.model.register_forward_hook(lambda module, args, output: recorded.append(output.router_logits is not None))
    batch = padded_and_padding_free_batches(AutoTokenizer.from_pretrained(moe_model_dir))["padded"]
    with torch.no_grad():
        model(**batch, loss_head=HiddenStateHead())
        model(**batch, output_router_logits=True, loss_head=HiddenStateHead())
        assert model(**batch, loss_head=LossHead("sft")).aux_loss is not None
    assert recorded == [False, False, True]


# ----------------------------------------------------------------------------------------- against stock TRL


@pytest.mark.parametrize("coef", [None, 0.5], ids=["config-coef", "coef-0.5"])
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_matches_stock_with_the_router_aux_loss(moe_model_dir, tmp_path, loss_type, coef):
    """`router_aux_loss_coef=None` takes the config's coefficient (TRL's default); gradient accumulation divides
    the aux loss by the accumulation steps."""
    stock, fused = train_stock_and_fused(
        moe_model_dir,
        tmp_path,
        loss_type=loss_type,
        router_aux_loss_coef=coef,
        gradient_accumulation_steps=2,
        assistant_only_loss=True,
        learning_rate=0.5 if loss_type == "nll" else 50.0,
    )
    expected_coef = fused.model.config.router_aux_loss_coef if coef is None else coef
    assert fused.aux_loss_enabled and fused.router_aux_loss_coef == expected_coef > 0
    assert len(logged(fused, "aux_loss")) == 4
    assert_same_training(stock, fused)


@pytest.mark.parametrize("layout", ["padding_free", "packing"])
def test_matches_stock_on_packed_batches(moe_model_dir, tmp_path, layout):
    """No attention mask: every token counts in the aux loss, as in the model's forward."""
    if layout == "padding_free":
        overrides = {"padding_free": True, "max_length": None}
    else:
        overrides = {"packing": True, "max_length": 128}
    stock, fused = train_stock_and_fused(moe_model_dir, tmp_path, router_aux_loss_coef=0.5, **overrides)
    assert_same_training(stock, fused)


def test_lora_on_the_experts_matches_stock(moe_model_dir, tmp_path):
    stock, fused = train_stock_and_fused(
        moe_model_dir,
        tmp_path,
        peft_config=LoraConfig(**EXPERT_LORA),
        router_aux_loss_coef=0.5,
        gradient_accumulation_steps=2,
        learning_rate=20.0,
    )
    assert_same_training(stock, fused)
    trained = {name: p for name, p in fused.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    # The adapters move (LoRA's B starts at zero) well beyond the tolerance of the comparison
    assert max(p.abs().max().item() for name, p in trained.items() if "lora_B" in name) > 100 * ATOL


def test_zero_coefficient_turns_the_aux_loss_off_as_in_stock(moe_model_dir, tmp_path):
    stock, fused = train_stock_and_fused(moe_model_dir, tmp_path / "off", router_aux_loss_coef=0.0)
    assert not fused.aux_loss_enabled and not fused.model.config.output_router_logits
    assert logged(fused, "aux_loss") == logged(stock, "aux_loss") == []
    assert_same_training(stock, fused)
    # The aux loss does reach the parameters: with it on, the router is trained differently
    on = make_trainer(FusedSFTTrainer, FusedSFTConfig, moe_model_dir, tmp_path / "on", router_aux_loss_coef=0.5)
    on.train()
    largest = max((a - b).abs().max().item() for a, b in zip(on.model.parameters(), fused.model.parameters()))
    assert largest > 100 * ATOL


# --------------------------------------------------------------------------------------- the method trainers


def method_trainer(name, model_dir, output_dir):
    if name == "asft":  # the adapters-off reference: a second, no-grad forward of the same MoE model
        return make_trainer(ASFTTrainer, ASFTConfig, model_dir, output_dir, peft_config=LoraConfig(**EXPERT_LORA))
    if name == "otr":
        return make_trainer(OTRTrainer, OTRConfig, model_dir, output_dir)
    if name == "poft":
        dataset = tiny_conversational_dataset(16)
        dataset = dataset.add_column("ref_score", [-4.0 - 0.1 * i for i in range(len(dataset))])
        return make_trainer(PoFTTrainer, PoFTConfig, model_dir, output_dir, dataset=dataset)
    if name == "tl":  # its token weights come from tool-calling conversations, rendered with tool calls
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = TOOL_CHAT_TEMPLATE
        return make_trainer(
            TLTrainer, TLConfig, model_dir, output_dir, dataset=tiny_tool_calling_dataset(16), tokenizer=tokenizer
        )
    if name == "uds":  # the scoring pass: a no-grad forward over the candidates
        cls = with_uds(FusedSFTTrainer)
        return make_trainer(cls, cls.config_class, model_dir, output_dir, per_device_train_batch_size=4)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["asft", "otr", "poft", "tl", "uds"])
def test_method_trainers_add_the_aux_loss(moe_model_dir, tmp_path, name):
    trainer = method_trainer(name, moe_model_dir, tmp_path)
    recorded = []
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    backbone = model.model
    backbone.register_forward_hook(lambda module, args, output: recorded.append(output.router_logits is not None))
    trainer.train()
    losses, aux = logged(trainer), logged(trainer, "aux_loss")
    assert len(losses) == len(aux) == 4
    assert all(math.isfinite(x) for x in losses) and all(math.isfinite(x) and x > 0 for x in aux)
    # Router logits only for the training forwards (one per step here), never for reference or scoring passes
    assert sum(recorded) == 4
    if name in ("asft", "uds"):
        assert len(recorded) > 4
