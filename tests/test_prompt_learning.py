"""Prompt-learning PEFT (prompt tuning, p-tuning, prefix tuning: the types TRL's SFT suite trains) with every trainer.

PEFT's forward prepends `num_virtual_tokens` positions for prompt tuning and p-tuning (virtual-token embeddings with
label -100; the last one predicts the caller's first token) and passes prefix tuning's prefix as a KV cache (no new
position). The fused head and every second forward (ASFT's reference, UDS's scoring) must see positions aligned with
the caller's `input_ids`. Checked here: FusedSFT equals stock `SFTTrainer` step by step; ASFT's loss and gradients
equal a hand-built float64 loss whose reference is the base model run on the unprefixed inputs (no KL at the first
token, which only the policy predicts); ASFT with `kl_coef=0` is DFT; a separate `ref_model` equals the adapters-off
reference; PoFT and TL losses equal their definitions on PEFT's own logits; TRL's prompt-learning tests pass with our
trainers swapped in; UDS selects with prompt tuning; CPT is refused before training.
"""

from types import SimpleNamespace

import pytest
import testing_utils
import torch
from testing_utils import (
    F64,
    IGNORE,
    assert_same_parameters,
    logged,
    needs_triton,
    one_block_per_row,
    per_sequence_weighted_mean,
    tiny_lora_config,
)
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
    poft_loss,
    score_with_aligned_models,
    with_uds,
)
from hf_plugins.data.scoring import tokenize_response
from hf_plugins.modeling import LossHead
from hf_plugins.testing import (
    TOOL_CHAT_TEMPLATE,
    tiny_conversational_dataset,
    tiny_language_modeling_dataset,
    tiny_tool_calling_dataset,
)


peft = pytest.importorskip("peft")

NUM_VIRTUAL_TOKENS = 4
KINDS = ("prompt_tuning", "p_tuning", "prefix_tuning")


def peft_config(kind: str, num_virtual_tokens: int = NUM_VIRTUAL_TOKENS):
    """The configs of TRL's `test_train_with_peft_config_prompt_tuning`."""
    task = peft.TaskType.CAUSAL_LM
    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)
    if kind == "p_tuning":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)


def prepended(kind: str) -> int:
    """Positions PEFT's forward prepends to the caller's sequence (prefix tuning's prefix is a KV cache)."""
    return 0 if kind == "prefix_tuning" else NUM_VIRTUAL_TOKENS


def make_trainer(cls, config_cls, model_dir, output_dir, kind, *, dataset=None, **overrides):
    """`cls` with the prompt-learning adapter `kind` (None: no adapter), on 16 plain texts by default."""
    return testing_utils.make_trainer(
        cls,
        config_cls,
        model_dir,
        output_dir,
        tiny_language_modeling_dataset(16) if dataset is None else dataset,
        peft_config=peft_config(kind) if kind is not None else None,
        init_seed=0,  # the same virtual-token initialisation in every trainer of a test
        **{"learning_rate": 5e-2, "per_device_train_batch_size": 4, **overrides},
    )


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    return batch


def predicting_logits(trainer, batch, kind):
    """PEFT's own forward (logits materialised) at the positions that predict the caller's tokens, and the labels
    they predict: with virtual tokens, position `v - 1 + t` predicts token t (token 0 from the last virtual token)."""
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.to(F64)
    v = prepended(kind)
    assert logits.shape[1] == batch["input_ids"].shape[1] + v
    if v:
        return logits[:, v - 1 : -1], batch["labels"]
    return logits[:, :-1], batch["labels"][:, 1:]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- FusedSFT == stock


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_sft_equals_stock_sft_trainer_step_by_step(tiny_model_dir, tmp_path, kind, loss_type):
    # plain SGD: Adam would turn float noise in near-zero gradients into full-size steps of either sign
    extra = dict(loss_type=loss_type, optim="sgd", learning_rate=1.0 if loss_type == "nll" else 50.0)
    stock = make_trainer(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path / "stock", kind, **extra)
    stock.train()
    fused = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path / "fused", kind, **extra)
    fused.train()
    losses = logged(fused)
    assert len(losses) == 3 and len({round(x, 5) for x in losses}) > 1  # the losses move
    assert losses == pytest.approx(logged(stock), rel=1e-5, abs=1e-6)
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert logged(fused, key) == pytest.approx(logged(stock, key), abs=1e-4), key
    assert_same_parameters(stock, fused)


# ---------------------------------------------------------------------------------------------------------- ASFT


@pytest.mark.parametrize("kind", KINDS)
def test_asft_kl_coef_zero_trains_like_fused_dft(tiny_model_dir, tmp_path, kind):
    asft = make_trainer(ASFTTrainer, ASFTConfig, tiny_model_dir, tmp_path / "asft", kind, kl_coef=0.0)
    asft.train()
    dft = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path / "dft", kind, loss_type="dft")
    dft.train()
    assert logged(asft) == pytest.approx(logged(dft), rel=1e-5, abs=1e-7)
    kl = logged(asft, "kl")
    # the virtual tokens (or the prefix) make the policy differ from the adapters-off reference from the start
    assert len(kl) == 3 and all(value > 0 for value in kl)
    for p_asft, p_dft in zip(trainable(asft.model), trainable(dft.model)):
        torch.testing.assert_close(p_asft, p_dft, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_asft_loss_and_gradients_equal_a_hand_built_reference(tiny_model_dir, tmp_path, kind):
    """In float64: DFT on PEFT's own logits plus `kl_coef * KL(q || p)`, with `q` from a separately loaded base model
    run on the unprefixed inputs. The first token, which the policy predicts from its last virtual token, has no
    reference prediction: DFT alone there."""
    kl_coef = 0.5
    trainer = make_trainer(
        ASFTTrainer,
        ASFTConfig,
        tiny_model_dir,
        tmp_path,
        kind,
        kl_coef=kl_coef,
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64),
    )
    assert trainer.ref_model is None  # the adapters-off reference
    batch = first_batch(trainer)
    assert (batch["labels"][:, 0] != IGNORE).all()  # language modelling: the first token is trained
    params = trainable(trainer.model)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    grads = torch.autograd.grad(loss, params)

    logits, labels = predicting_logits(trainer, batch, kind)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64)
    with torch.no_grad():
        # position t of the base model predicts token t + 1
        ref_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = labels != IGNORE
    log_p = torch.log_softmax(logits, -1)
    label_log_p = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = -label_log_p.detach().exp() * label_log_p
    log_q = torch.log_softmax(ref_logits, -1)
    anchored = log_p[:, 1:] if prepended(kind) else log_p  # the positions the reference predicts too
    kl = (log_q.exp() * (log_q - anchored)).sum(-1)
    if prepended(kind):
        kl = torch.cat([torch.zeros_like(kl[:, :1]), kl], dim=1)
    expected = (per_token + kl_coef * kl).masked_fill(~mask, 0.0).sum() / mask.sum()
    expected_grads = torch.autograd.grad(expected, params)

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.to(F64), want.to(F64), rtol=1e-8, atol=1e-10)
    assert float(kl.masked_fill(~mask, 0).sum()) > 1e-3  # the KL term is really part of the comparison


@pytest.mark.parametrize("kind", KINDS)
def test_asft_separate_ref_model_equals_the_adapters_off_reference(tiny_model_dir, tmp_path, kind):
    runs = {}
    for source, ref_model in (("adapters-off", None), ("path", tiny_model_dir)):
        trainer = make_trainer(
            ASFTTrainer,
            ASFTConfig,
            tiny_model_dir,
            tmp_path / source,
            kind,
            kl_coef=0.5,
            trainer_kwargs={"ref_model": ref_model},
        )
        assert (trainer.ref_model is None) == (ref_model is None)
        trainer.train()
        runs[source] = logged(trainer) + logged(trainer, "kl")
    assert all(torch.isfinite(torch.tensor(runs["path"])))
    assert runs["path"] == pytest.approx(runs["adapters-off"], rel=1e-5, abs=1e-7)


@needs_triton
def test_asft_triton_backend_trains_like_chunked_under_prompt_tuning(tiny_model_dir, tmp_path, monkeypatch):
    """The fused kernel takes the per-row KL factor (0 at the first token): same losses and KL as `chunked`."""
    one_block_per_row(monkeypatch)
    runs = {}
    for backend in ("chunked", "triton"):
        trainer = make_trainer(
            ASFTTrainer,
            ASFTConfig,
            tiny_model_dir,
            tmp_path / backend,
            "prompt_tuning",
            kl_coef=0.5,
            loss_backend=backend,
            max_steps=2,
            per_device_train_batch_size=2,
        )
        trainer.train()
        runs[backend] = (logged(trainer), logged(trainer, "kl"))
    assert runs["triton"][0] == pytest.approx(runs["chunked"][0], rel=1e-5)
    # the KL is ~1e-4 here (two near-uniform heads): float32 rounding of its terms sets an absolute tolerance
    assert runs["triton"][1] == pytest.approx(runs["chunked"][1], abs=1e-6)


# ------------------------------------------------------------------------------------- PoFT and TL on PEFT logits


@pytest.mark.parametrize("kind", KINDS)
def test_poft_loss_is_poft_loss_of_peft_logits(tiny_model_dir, tmp_path, kind):
    dataset = tiny_conversational_dataset(8)
    dataset = dataset.add_column("ref_score", [-4.0 - 0.25 * i for i in range(len(dataset))])
    trainer = make_trainer(
        PoFTTrainer,
        PoFTConfig,
        tiny_model_dir,
        tmp_path,
        kind,
        dataset=dataset,
        beta=1.5,
        gamma=0.5,
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64),
    )
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logits, labels = predicting_logits(trainer, batch, kind)
    expected = poft_loss(logits, labels, batch["ref_score"].to(F64), beta=1.5, gamma=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_tl_loss_weighs_the_tokens_the_virtual_positions_predict(tiny_model_dir, tmp_path, kind):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    trainer = make_trainer(
        TLTrainer,
        TLConfig,
        tiny_model_dir,
        tmp_path,
        kind,
        dataset=tiny_tool_calling_dataset(8),
        tokenizer=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64),
    )
    batch = first_batch(trainer)
    assert batch["token_weights"].max() > 1  # key tokens weigh more: a misaligned weight changes the loss
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logits, labels = predicting_logits(trainer, batch, kind)
    weights = batch["token_weights"].to(F64)
    aligned = weights if prepended(kind) else weights[:, 1:]
    expected = per_sequence_weighted_mean(logits, labels, aligned)
    # the weights are float32 in the batch (and normalised in float32): their rounding bounds the agreement
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-8)
    shifted = torch.cat([aligned[:, 1:], aligned[:, -1:]], dim=1)  # each weight on its neighbour's token
    assert abs(float(per_sequence_weighted_mean(logits, labels, shifted)) - float(loss)) > 1e-4


@pytest.mark.parametrize("kind", ["lora", *KINDS])
def test_poft_scoring_with_a_peft_aligned_model(tiny_model_dir, tmp_path, kind):
    """An aligned model given as a PEFT model scores through PEFT's forward: its mean log-prob of the response tokens
    equals the one from its own materialised logits (token t predicted at position `v + t - 1`)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    if kind == "lora":
        config = tiny_lora_config(init_lora_weights=False)
    else:
        config = peft_config(kind)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).eval()
    dataset = tiny_conversational_dataset(4)
    scores = score_with_aligned_models(dataset, model, tokenizer, cache_dir=str(tmp_path), batch_size=2)["ref_score"]
    v = 0 if kind == "lora" else prepended(kind)
    for example, score in zip(dataset, scores):
        ids, scored = tokenize_response(example, tokenizer)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].to(F64)
        log_probs = torch.log_softmax(logits[v : v + len(ids) - 1], -1)  # position v + t - 1 predicts token t
        picked = log_probs.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        expected = picked[torch.tensor(scored[1:])].mean()
        assert score == pytest.approx(float(expected), rel=1e-5)
    base_scores = score_with_aligned_models(
        dataset, AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, cache_dir=str(tmp_path)
    )["ref_score"]
    assert all(abs(a - b) > 1e-5 for a, b in zip(scores, base_scores))  # the adapter is part of the score


# --------------------------------------------------------------- TRL's prompt-learning tests, trainers swapped in


def trl_style_run(cls, config_cls, model_dir, output_dir, kind=None, model=None, **overrides):
    """TRL's `test_train_with_peft_config_prompt_tuning` / `test_prompt_tuning(_peft_model)`: train, then every
    adapter parameter has changed and no base parameter has."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = {}
    if cls is TLTrainer:
        tokenizer.chat_template = TOOL_CHAT_TEMPLATE
        settings["dataset"] = tiny_tool_calling_dataset(8)
    elif cls is PoFTTrainer:
        dataset = tiny_language_modeling_dataset(8)
        settings["dataset"] = dataset.add_column("ref_score", [-5.0] * len(dataset))
    config = {
        "learning_rate": 2e-5,
        "lr_scheduler_type": "linear",
        "per_device_train_batch_size": 8,
        "max_steps": 2,
        **overrides,
    }
    trainer = make_trainer(
        cls, config_cls, model_dir, output_dir, kind, model=model, tokenizer=tokenizer, **settings, **config
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base_names = {f"base_model.{name}" for name, _ in base.named_parameters()}
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert all(torch.isfinite(torch.tensor(logged(trainer))))
    assert logged(trainer, "mean_token_accuracy")
    adapters = 0
    for name, old in before.items():
        new = trainer.model.get_parameter(name)
        if name in base_names:
            torch.testing.assert_close(new, old, msg=f"base parameter {name} changed")
        else:
            adapters += 1
            assert not torch.equal(new, old), f"adapter parameter {name} did not change"
    assert adapters > 0


TRAINERS = {
    "fused_sft": (FusedSFTTrainer, FusedSFTConfig, {}),
    "asft": (ASFTTrainer, ASFTConfig, {"kl_coef": 0.05}),
    "otr": (OTRTrainer, OTRConfig, {}),
    "poft": (PoFTTrainer, PoFTConfig, {}),
    "tl": (TLTrainer, TLConfig, {}),
}


@pytest.mark.parametrize("trainer_name", list(TRAINERS))
@pytest.mark.parametrize("kind", KINDS)
def test_trl_train_with_peft_config_prompt_tuning(tiny_model_dir, tmp_path, kind, trainer_name):
    cls, config_cls, overrides = TRAINERS[trainer_name]
    trl_style_run(cls, config_cls, tiny_model_dir, tmp_path, kind, **overrides)


@pytest.mark.parametrize("trainer_name", ["fused_sft", "asft"])
def test_trl_prompt_tuning_with_gradient_checkpointing_and_a_peft_model(tiny_model_dir, tmp_path, trainer_name):
    """TRL's `test_prompt_tuning` (p-tuning, 8 virtual tokens, SFTConfig's default gradient checkpointing) and
    `test_prompt_tuning_peft_model` (the PEFT model built before the trainer)."""
    cls, config_cls, overrides = TRAINERS[trainer_name]
    config = peft.PromptEncoderConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=8)
    trainer = make_trainer(
        cls,
        config_cls,
        tiny_model_dir,
        tmp_path / "a",
        None,
        gradient_checkpointing=True,
        trainer_kwargs={"peft_config": config},
        **overrides,
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(logged(trainer))))
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_config("p_tuning", 8))
    trl_style_run(cls, config_cls, tiny_model_dir, tmp_path / "b", model=model, **overrides)


# ----------------------------------------------------------------------------------------------------------- UDS


@pytest.mark.parametrize("base", [FusedSFTTrainer, ASFTTrainer, SFTTrainer], ids=["fused", "asft", "trl-sft"])
def test_uds_scores_the_callers_positions_under_prompt_tuning(tiny_model_dir, tmp_path, base):
    cls = with_uds(base)
    config_cls = getattr(cls, "config_class", None) or with_uds(SFTConfig)
    trainer = make_trainer(
        cls,
        config_cls,
        tiny_model_dir,
        tmp_path,
        "prompt_tuning",
        max_steps=2,
        dataset=tiny_conversational_dataset(16),
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(logged(trainer))))
    assert len(logged(trainer, "uds/utility")) == 2 and all(u > 0 for u in logged(trainer, "uds/utility"))


# ---------------------------------------------------------------------------------------------------- refusals


def test_cpt_is_refused_before_training(tiny_model_dir, tmp_path):
    config = peft.CPTConfig(
        task_type=peft.TaskType.CAUSAL_LM, cpt_token_ids=[5, 6, 7], cpt_mask=[1, 1, 1], cpt_tokens_type_mask=[1, 2, 3]
    )
    for cls, config_cls in ((FusedSFTTrainer, FusedSFTConfig), (ASFTTrainer, ASFTConfig)):
        with pytest.raises(ValueError, match="does not support CPT .*full logits"):
            make_trainer(cls, config_cls, tiny_model_dir, tmp_path, None, trainer_kwargs={"peft_config": config})


def test_context_parallelism_with_virtual_tokens_is_refused(tiny_model_dir, tmp_path):
    trainer = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path, "prompt_tuning")
    with pytest.raises(ValueError, match="PROMPT_TUNING with context parallelism"):
        trainer._check_prompt_learning(SimpleNamespace(cp_enabled=True))
    trainer._check_prompt_learning(SimpleNamespace(cp_enabled=False))
    prefix = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path, "prefix_tuning")
    prefix._check_prompt_learning(SimpleNamespace(cp_enabled=True))  # no position to align: allowed
    # the head refuses pre-shifted labels with virtual positions too, rather than misalign them
    head = LossHead(method="sft", sequence_length=3)
    lm_head = torch.nn.Linear(4, 5, bias=False)
    with pytest.raises(ValueError, match="Pre-shifted labels"):
        head(torch.zeros(1, 5, 4), torch.zeros(1, 3, dtype=torch.long), lm_head, pre_shifted=True)
