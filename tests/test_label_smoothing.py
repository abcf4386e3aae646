"""Label smoothing (`label_smoothing_factor`, `loss_type="nll"`): the target `(1 - eps) * one_hot(y) + eps / V`, built
in the fused head, equal to transformers' `LabelSmoother` (what TRL's SFTTrainer applies) on the materialised logits,
on every backend, and FusedSFTTrainer equal to stock SFTTrainer step by step."""

import os

import pytest
import torch
from testing_utils import logged
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_pt_utils import LabelSmoother
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
)
from hf_plugins.losses import sft_loss
from hf_plugins.ops import fused_linear_loss
from hf_plugins.ops.liger import liger_available
from hf_plugins.testing import CPU_TRAINING_ARGS, save_tiny_model, tiny_conversational_dataset


F64 = torch.float64
IGNORE = -100
BACKENDS = ("chunked", "reference", "triton")
EPS = 0.1


def make_inputs(B=3, T=7, V=37, D=8, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=F64).requires_grad_(True)
    weight = (2.0 / D**0.5 * torch.randn(V, D, generator=g, dtype=F64)).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=F64).requires_grad_(True) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.25] = IGNORE
    return hidden, weight, b, labels


def logits_of(hidden, weight, bias):
    return hidden @ weight.t() + (bias if bias is not None else 0.0)


@pytest.mark.parametrize("num_items", [None, 40, "tensor"])
@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_sft_loss_equals_transformers_label_smoother(eps, num_items):
    """`LabelSmoother` on (already aligned) logits, with its -100 handling and both reductions; it sums the smoothing
    term in float32, hence the tolerance."""
    hidden, weight, b, labels = make_inputs(seed=1)
    n = torch.tensor(40) if num_items == "tensor" else num_items
    logits = logits_of(hidden, weight, b)
    ours = sft_loss(logits, labels, num_items_in_batch=n, label_smoothing=eps)
    theirs = LabelSmoother(epsilon=eps)({"logits": logits}, labels, num_items_in_batch=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    leaves = (hidden, weight, b)
    mine, stock = torch.autograd.grad(ours, leaves, retain_graph=True), torch.autograd.grad(theirs, leaves)
    for grad, exp in zip(mine, stock, strict=True):
        torch.testing.assert_close(grad, exp, rtol=1e-6, atol=1e-9)
    assert abs(ours.item() - sft_loss(logits, labels, num_items_in_batch=n).item()) > 1e-3  # it smooths


@pytest.mark.parametrize("num_items", [None, 40])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_equals_the_smoothed_functional_loss(backend, bias, num_items):
    hidden, weight, b, labels = make_inputs(seed=2, bias=bias)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    loss, metrics = fused_linear_loss(
        hidden, weight, labels, "sft", bias=b, backend=backend, chunk_size=5, num_items_in_batch=num_items,
        label_smoothing=EPS, return_metrics=True,
    )  # fmt: skip
    expected = sft_loss(logits_of(hidden, weight, b), labels, num_items_in_batch=num_items, label_smoothing=EPS)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)
    for grad, exp in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves), strict=True):
        torch.testing.assert_close(grad, exp, rtol=1e-10, atol=1e-12)
    # the metrics are the unsmoothed model's, as stock logs them
    plain = fused_linear_loss(hidden, weight, labels, "sft", bias=b, backend=backend, return_metrics=True)[1]
    assert metrics == pytest.approx(plain, rel=1e-12)


@pytest.mark.skipif(not liger_available(), reason="liger-kernel is not installed")
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="needs a GPU or the Triton interpreter",
)
def test_liger_backend_smooths_like_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, _, labels = make_inputs(B=4, T=10, V=301, D=16, seed=3, bias=False)
    hidden, weight = (t.detach().float().to(device).requires_grad_(True) for t in (hidden, weight))
    labels = labels.to(device)
    out = {}
    for backend in ("liger", "reference"):
        loss = fused_linear_loss(hidden, weight, labels, "sft", backend=backend, label_smoothing=EPS)
        out[backend] = (loss.detach(), torch.autograd.grad(loss, (hidden, weight)))
    torch.testing.assert_close(out["liger"][0], out["reference"][0], rtol=1e-5, atol=1e-6)
    for grad, exp in zip(out["liger"][1], out["reference"][1], strict=True):
        torch.testing.assert_close(grad, exp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_label_smoothing_is_refused(eps):
    hidden, weight, b, labels = make_inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_loss(hidden, weight, labels, "sft", label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_loss(logits_of(hidden, weight, b), labels, label_smoothing=eps)


def test_no_smoothing_is_the_plain_loss_exactly():
    hidden, weight, b, labels = make_inputs(seed=4)
    plain = fused_linear_loss(hidden, weight, labels, "sft", bias=b)
    assert torch.equal(fused_linear_loss(hidden, weight, labels, "sft", bias=b, label_smoothing=0.0), plain)


# ------------------------------------------------------------------------------------------------- the trainers


CPU_ARGS = dict(
    **CPU_TRAINING_ARGS, optim="sgd", learning_rate=0.5, max_steps=4, per_device_train_batch_size=2,
    gradient_accumulation_steps=2, assistant_only_loss=True,
)  # fmt: skip


def make_trainer(trainer_cls, config_cls, model_dir, tmp_path, eval_dataset=None, **overrides):
    args = {**CPU_ARGS, "output_dir": str(tmp_path / trainer_cls.__name__), **overrides}
    return trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=config_cls(**args),
        train_dataset=tiny_conversational_dataset(16),
        eval_dataset=eval_dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


@pytest.mark.parametrize("arch", ["llama", "gemma2"], ids=["llama", "gemma2-softcap"])
def test_trains_like_stock_sft_trainer(tmp_path, arch):
    """Gradient accumulation (the global `num_items_in_batch`), evaluation (smoothed too), and a soft-capped model
    whose smoothed target applies to the capped logits."""
    model_dir = save_tiny_model(tmp_path / arch, arch=arch, dtype=F64)
    eval_dataset = tiny_conversational_dataset(6, seed=1)
    runs = {}
    for name, cls, config_cls in (("stock", SFTTrainer, SFTConfig), ("fused", FusedSFTTrainer, FusedSFTConfig)):
        trainer = make_trainer(cls, config_cls, model_dir, tmp_path, eval_dataset, label_smoothing_factor=EPS)
        trainer.train()
        runs[name] = trainer
    stock, fused = runs["stock"], runs["fused"]
    # float64 models; TRL's metrics come from its float32 head and Trainer logs through a float32 accumulator
    assert logged(fused) == pytest.approx(logged(stock), rel=1e-6)
    assert len(set(logged(fused))) == CPU_ARGS["max_steps"]
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert logged(fused, key) == pytest.approx(logged(stock, key), rel=1e-6)
    for (name, p_stock), p_fused in zip(stock.model.named_parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(p_fused, p_stock, rtol=1e-6, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
    assert fused.evaluate()["eval_loss"] == pytest.approx(stock.evaluate()["eval_loss"], rel=1e-6)
    # and the smoothing acts: near the uniform distribution of initialisation it moves the loss little, but far more
    # than the tolerance above
    plain = make_trainer(FusedSFTTrainer, FusedSFTConfig, model_dir, tmp_path / "plain", max_steps=1)
    plain.train()
    assert abs(logged(plain)[0] - logged(fused)[0]) > 5e-4


def test_dft_ignores_label_smoothing_like_stock(tiny_model_dir, tmp_path):
    """TRL's SFTTrainer applies the smoother for `loss_type="nll"` only and trains DFT unsmoothed: so do we, with a
    warning."""
    args = dict(loss_type="dft", label_smoothing_factor=EPS, learning_rate=20.0)
    stock = make_trainer(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path, **args)
    stock.train()
    with pytest.warns(UserWarning, match="label_smoothing_factor=0.1` is ignored with `loss_type='dft'`"):
        fused = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path, **args)
    fused.train()
    assert logged(fused) == pytest.approx(logged(stock), rel=1e-6)
    for p_stock, p_fused in zip(stock.model.parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(p_fused, p_stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "trainer_cls, config_cls",
    [(ASFTTrainer, ASFTConfig), (OTRTrainer, OTRConfig), (PoFTTrainer, PoFTConfig), (TLTrainer, TLConfig)],
)
def test_method_trainers_refuse_label_smoothing(tiny_model_dir, tmp_path, trainer_cls, config_cls):
    with pytest.raises(ValueError, match=f"`label_smoothing_factor=0.1` cannot be used with {trainer_cls.__name__}"):
        make_trainer(trainer_cls, config_cls, tiny_model_dir, tmp_path, label_smoothing_factor=EPS)


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_label_smoothing_out_of_range_is_refused(tiny_model_dir, tmp_path, eps):
    with pytest.raises(ValueError, match=f"`label_smoothing_factor={eps}` must be in"):
        make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path, label_smoothing_factor=eps)
