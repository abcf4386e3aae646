"""Models that transform their logits after the lm_head (Gemma 2/3's soft-cap, Cohere's `logit_scale`, Granite's
`logits_scaling`, ...): the fused head, every backend and every method, against the functional losses on the
transformed materialised logits (float64, loss and gradients); the transform read from the config as the model's own
forward applies it; and the trainers against stock TRL on such models."""

import math

import pytest
import torch
from testing_utils import logged
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from trl import SFTConfig, SFTTrainer

from hf_plugins import ASFTConfig, ASFTTrainer, FusedSFTConfig, FusedSFTTrainer
from hf_plugins.losses import (
    GRPOMethod,
    asft_loss,
    dft_loss,
    grpo_loss,
    otr_loss,
    poft_loss,
    sft_loss,
    weighted_sft_loss,
)
from hf_plugins.modeling import add_loss_head_forward, forward_hidden_states, logit_transform
from hf_plugins.ops import LogitTransform, fused_linear_loss
from hf_plugins.testing import (
    CPU_TRAINING_ARGS,
    LOGIT_TRANSFORM_ARCHS,
    TINY_LOGIT_TRANSFORMS,
    save_tiny_model,
    tiny_conversational_dataset,
)


F64 = torch.float64
IGNORE = -100
BACKENDS = ("chunked", "reference", "triton")
TOLERANCE = dict(rtol=1e-9, atol=1e-11)
#: Each acts on logits of std ~2: a scale alone, a soft-cap alone (tanh far from linear), both
TRANSFORMS = {
    "scale": LogitTransform(scale=0.6),
    "softcap": LogitTransform(softcap=1.5),
    "scale+softcap": LogitTransform(scale=1.7, softcap=2.0),
}
#: ASFT's reference gets a transform of its own, so that the test tells the two apart
REF_TRANSFORM = LogitTransform(scale=0.8, softcap=1.2)
METHODS = ("sft", "sft-smoothed", "dft", "weighted", "asft", "otr-exact", "otr-sampled", "poft")


# ---------------------------------------------------------------------------------------------------------- the head


def make_inputs(B=3, T=7, V=37, D=8, D_ref=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return scale * torch.randn(*size, generator=g, dtype=F64)

    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.25] = IGNORE
    return {
        "hidden": rand(B, T, D).requires_grad_(True),
        "weight": rand(V, D, scale=2.0 / D**0.5).requires_grad_(True),
        "bias": rand(V).requires_grad_(True),
        "labels": labels,
        "token_weights": 2 * torch.rand(B, T, generator=g, dtype=F64),
        "ref_hidden": rand(B, T, D_ref),
        "ref_weight": rand(V, D_ref, scale=2.0 / D_ref**0.5),
        "ref_scores": -3.0 + rand(B),
    }


def method_call(method, x):
    """(fused method name, fused inputs, functional loss of the logits)."""
    labels = x["labels"]
    if method == "sft":
        return "sft", {}, lambda z: sft_loss(z, labels)
    if method == "sft-smoothed":
        return "sft", {"label_smoothing": 0.2}, lambda z: sft_loss(z, labels, label_smoothing=0.2)
    if method == "dft":
        return "dft", {}, lambda z: dft_loss(z, labels)
    if method == "weighted":
        weights = x["token_weights"]
        return "weighted", {"token_weights": weights}, lambda z: weighted_sft_loss(z, labels, weights)
    if method == "asft":
        ref_logits = REF_TRANSFORM(x["ref_hidden"] @ x["ref_weight"].t())
        inputs = {
            "ref_hidden": x["ref_hidden"], "ref_weight": x["ref_weight"], "kl_coef": 0.3,
            "ref_logit_transform": REF_TRANSFORM,
        }  # fmt: skip
        return "asft", inputs, lambda z: asft_loss(z, ref_logits, labels, kl_coef=0.3)
    if method == "otr-exact":
        settings = {"num_samples": None, "temperature": 1.3, "negative_reward": -0.2}
        return "otr", settings, lambda z: otr_loss(z, labels, **settings)
    if method == "otr-sampled":
        settings = {"num_samples": 4, "temperature": 1.3, "negative_reward": -0.2}
        inputs = {**settings, "generator": torch.Generator().manual_seed(3)}
        return "otr", inputs, lambda z: otr_loss(z, labels, generator=torch.Generator().manual_seed(3), **settings)
    scores = x["ref_scores"]
    return "poft", {"ref_scores": scores}, lambda z: poft_loss(z, labels, scores)


def leaves(x):
    return x["hidden"], x["weight"], x["bias"]


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_the_transformed_logits(method, backend, transform):
    x = make_inputs(seed=METHODS.index(method))
    name, inputs, functional = method_call(method, x)
    loss, metrics = fused_linear_loss(
        x["hidden"], x["weight"], x["labels"], name, bias=x["bias"], backend=backend, chunk_size=5,
        logit_transform=transform, return_metrics=True, **inputs,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, leaves(x))
    logits = transform(x["hidden"] @ x["weight"].t() + x["bias"])
    expected = functional(logits)
    expected_grads = torch.autograd.grad(expected, leaves(x))
    torch.testing.assert_close(loss, expected.detach(), **TOLERANCE)
    for grad, exp in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, exp, **TOLERANCE)
    # the metrics are those of the model's distribution too
    mask = x["labels"] != IGNORE
    log_probs = torch.log_softmax(logits.detach(), -1)[mask]
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    assert metrics["entropy"] == pytest.approx(entropy.item(), rel=1e-9)
    # the transform matters: the plain logits give another loss
    plain = functional(x["hidden"] @ x["weight"].t() + x["bias"])
    assert abs(plain.item() - expected.item()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_temperature_divides_the_soft_capped_logits(backend):
    """TRL's fused head divides the soft-capped logits by the temperature: the method's `logit_scale` (GRPO's
    1 / temperature) composes with the model's transform after the cap."""
    x = make_inputs(seed=11)
    transform = TRANSFORMS["scale+softcap"]
    g = torch.Generator().manual_seed(5)
    B, T = x["labels"].shape
    tensors = {
        "advantages": torch.randn(B, generator=g, dtype=F64),
        "old_log_probs": -3.0 + 0.5 * torch.randn(B, T, generator=g, dtype=F64),
    }
    options = {"loss_type": "dapo", "temperature": 0.7, "epsilon": 0.2}
    loss = fused_linear_loss(
        x["hidden"], x["weight"], x["labels"], GRPOMethod(), bias=x["bias"], backend=backend, chunk_size=5,
        logit_transform=transform, **tensors, **options,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, leaves(x))
    logits = transform(x["hidden"] @ x["weight"].t() + x["bias"])
    expected = grpo_loss(logits, x["labels"], **tensors, **options)
    torch.testing.assert_close(loss, expected.detach(), **TOLERANCE)
    for grad, exp in zip(grads, torch.autograd.grad(expected, leaves(x)), strict=True):
        torch.testing.assert_close(grad, exp, **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_cap_in_float32_and_bfloat16_is_upcast(backend):
    """Low-precision inputs: the logits are capped after the upcast (float32 arithmetic; bf16 tiles on triton)."""
    x = make_inputs(seed=4)
    transform = TRANSFORMS["scale+softcap"]
    logits = transform(x["hidden"] @ x["weight"].t() + x["bias"])
    expected = sft_loss(logits, x["labels"]).item()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        h, w, b = (t.detach().to(dtype).requires_grad_(True) for t in leaves(x))
        loss = fused_linear_loss(h, w, x["labels"], bias=b, backend=backend, logit_transform=transform)
        loss.backward()
        assert loss.item() == pytest.approx(expected, rel=tol)
        assert h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()


@pytest.mark.parametrize(
    "scale, softcap, match",
    [(float("nan"), None, "finite"), (True, None, "finite"), (1.0, 0.0, "> 0"), (1.0, -2.0, "> 0"),
     (1.0, float("inf"), "> 0")],
)  # fmt: skip
def test_bad_transforms_are_refused(scale, softcap, match):
    with pytest.raises(ValueError, match=match):
        LogitTransform(scale=scale, softcap=softcap)
    x = make_inputs()
    with pytest.raises(ValueError, match="LogitTransform"):
        fused_linear_loss(x["hidden"], x["weight"], x["labels"], logit_transform=2.0)


# ---------------------------------------------------------------------------------- the transform of a model


#: Tiny configs of families that transform their logits, with a transform that acts on tiny logits
FAMILIES = {
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 0.3},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 0.3},
    "vaultgemma": {"head_dim": 8, "final_logit_softcapping": 0.3},
    "cohere": {"logit_scale": 4.0},
    "cohere2": {"logit_scale": 4.0},
    "granite": {"logits_scaling": 0.25},
    "hyperclovax": {"logits_scaling": 4.0},
    "falcon_h1": {
        "lm_head_multiplier": 3.0, "head_dim": 8, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
        "mamba_d_state": 8,
    },
}  # fmt: skip


@pytest.mark.parametrize("model_type", FAMILIES)
def test_transform_is_what_the_model_applies_to_its_lm_head(model_type):
    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2, **FAMILIES[model_type],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(F64).eval()
    input_ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        add_loss_head_forward(model)
        out = forward_hidden_states(model, {"input_ids": input_ids})
    plain = out.hidden_states @ out.weight.t() + (out.bias if out.bias is not None else 0.0)
    assert out.logit_transform == logit_transform(model) and not out.logit_transform.is_identity
    torch.testing.assert_close(out.logit_transform(plain), logits, rtol=1e-12, atol=1e-12)
    assert (plain - logits).abs().max() > 0.05  # the transform acts on these logits


def test_scale_is_read_in_trls_order():
    def transform_of(model_type="llama", **fields):
        config = LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        config.model_type = model_type
        for name, value in fields.items():
            setattr(config, name, value)
        return logit_transform(type("Model", (), {"config": config})())

    assert transform_of() == LogitTransform()
    assert transform_of(logit_scale=None) == LogitTransform()  # MPT: None is unscaled
    assert transform_of(logit_scale=0.0) == LogitTransform(scale=0.0)  # a real 0 is kept
    assert transform_of(logit_scale=0.5, output_multiplier=2.0, lm_head_multiplier=3.0) == LogitTransform(scale=0.5)
    assert transform_of(logit_scale=None, output_multiplier=2.0, lm_head_multiplier=3.0).scale == 2.0
    assert transform_of(lm_head_multiplier=3.0, logits_scaling=4.0).scale == 3.0
    assert transform_of("granite", logits_scaling=4.0).scale == 0.25
    assert transform_of("minicpm3", logits_scaling=4.0).scale == 0.25
    assert transform_of("hyperclovax", logits_scaling=4.0).scale == 4.0
    both = transform_of(output_multiplier=2.0, final_logit_softcapping=30.0)
    assert both == LogitTransform(scale=2.0, softcap=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=0"):
        transform_of(final_logit_softcapping=0)
    with pytest.raises(ValueError, match="logits_scaling=0"):
        transform_of("granite", logits_scaling=0)
    with pytest.raises(ValueError, match="logit_scale='x'"):
        transform_of(logit_scale="x")


# ------------------------------------------------------------------------------------------------- the trainers


CPU_ARGS = dict(**CPU_TRAINING_ARGS, optim="sgd", max_steps=4, per_device_train_batch_size=4)


@pytest.fixture(scope="module", params=LOGIT_TRANSFORM_ARCHS)
def transformed_model_dir(request, tmp_path_factory):
    arch = request.param
    return save_tiny_model(tmp_path_factory.mktemp(arch), arch=arch, dtype=F64)


def make_trainer(trainer_cls, config_cls, model_dir, tmp_path, **overrides):
    args = {**CPU_ARGS, "output_dir": str(tmp_path / trainer_cls.__name__), "assistant_only_loss": True}
    args.update(overrides)
    return trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=config_cls(**args),
        train_dataset=tiny_conversational_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_trains_like_stock_sft_trainer(transformed_model_dir, tmp_path, loss_type):
    """Stock SFTTrainer's fused head applies the model's soft-cap / scale (TRL's `add_fused_lm_head`): ours equals it
    step by step (losses, metrics, parameters)."""
    config = AutoConfig.from_pretrained(transformed_model_dir)
    assert any(getattr(config, name) == value for name, value in TINY_LOGIT_TRANSFORMS[config.model_type].items())
    lr = {"nll": 0.5, "dft": 20.0}[loss_type]
    stock = make_trainer(SFTTrainer, SFTConfig, transformed_model_dir, tmp_path, loss_type=loss_type, learning_rate=lr)
    stock.train()
    fused = make_trainer(
        FusedSFTTrainer, FusedSFTConfig, transformed_model_dir, tmp_path, loss_type=loss_type, learning_rate=lr
    )
    fused.train()
    # float64 models, but TRL's head reduces each tile in float32 (and Trainer logs through a float32 accumulator):
    # float32 tolerances, far below what a missing or misplaced transform changes (checked on the first loss below)
    assert logged(fused) == pytest.approx(logged(stock), rel=1e-6)
    assert len(set(logged(fused))) == CPU_ARGS["max_steps"]
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert logged(fused, key) == pytest.approx(logged(stock, key), rel=1e-6)
    for (name, p_stock), p_fused in zip(stock.model.named_parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(p_fused, p_stock, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_first_loss_is_the_nll_of_the_models_own_logits(transformed_model_dir, tmp_path):
    trainer = make_trainer(FusedSFTTrainer, FusedSFTConfig, transformed_model_dir, tmp_path, max_steps=1)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = sft_loss(logits[:, :-1], batch["labels"][:, 1:])
        # the transform changes the loss: the lm_head's plain output gives another one
        hidden = forward_hidden_states(model, {k: batch[k] for k in ("input_ids", "attention_mask")}).hidden_states
        plain_logits = hidden @ model.lm_head.weight.t()
        plain = sft_loss(plain_logits[:, :-1], batch["labels"][:, 1:])
        loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # at initialisation the logits are small, so the loss moves little (most for the scales), but far more than the
    # tolerance of the comparison with stock above; the gradients move by up to 1 - tanh^2 or the scale itself
    assert abs(plain.item() - expected.item()) > 5e-5


def test_asft_reference_is_scored_with_its_transform(tmp_path_factory, tmp_path):
    """Before any update the policy is the reference: KL exactly 0 on a soft-capped model (a reference scored on its
    plain logits would be far from the capped policy), and the first loss is DFT's on the capped logits."""
    model_dir = save_tiny_model(tmp_path_factory.mktemp("gemma2"), arch="gemma2", dtype=F64)
    trainer = make_trainer(ASFTTrainer, ASFTConfig, model_dir, tmp_path, kl_coef=0.5, max_steps=2, learning_rate=0.5)
    trainer.train()
    kl = logged(trainer, "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-12) and kl[1] > 1e-9
    stock = make_trainer(SFTTrainer, SFTConfig, model_dir, tmp_path, loss_type="dft", max_steps=1, learning_rate=0.5)
    stock.train()
    assert logged(trainer)[0] == pytest.approx(logged(stock)[0], rel=1e-6)  # through float32 logs


def test_aligned_model_scores_use_the_models_transform(transformed_model_dir):
    from hf_plugins.data.scoring import score_batch

    model = AutoModelForCausalLM.from_pretrained(transformed_model_dir).eval()
    ids = [[5, 9, 14, 22, 31, 8], [7, 3, 12, 40]]
    scored = [[False, False, True, True, True, True], [False, True, True, True]]
    means = score_batch(model, ids, scored, pad_token_id=0)
    for row, (tokens, mask) in enumerate(zip(ids, scored, strict=True)):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0, :-1], -1)
        picked = log_probs.gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1)[torch.tensor(mask[1:])]
        assert means[row] == pytest.approx(picked.mean().item(), rel=1e-12)
        assert math.isfinite(means[row])
