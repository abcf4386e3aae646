"""ASFT (Anchored SFT): the fused `"asft"` method against `asft_loss`, and `ASFTTrainer` on the tiny offline model.

The fused head must equal the functional loss on materialised logits in value and gradients (float64, both backends),
the reference side must get no gradient, `kl_coef=0` must be DFT, and the logits gradient must be the closed form
`(w + lambda) p - w e_y - lambda q`. The trainer's three reference paths (adapters off, a given model, a frozen copy)
must give the same reference, stay frozen, and the logged KL must start at 0 and grow.
"""

import json
import logging
import math
import sys
import textwrap

import pytest
import testing_utils
import torch
import torch.nn.functional as F
from testing_utils import (
    BACKENDS,
    CLI_LORA_DROPOUT,
    CPU_ARGS,
    F64,
    IGNORE,
    TORCHRUN,
    LargestTensor,
    as_leaves,
    assert_matches,
    assert_packed_rows,
    assert_same_parameters,
    gen,
    leaves,
    logged,
    logits_of,
    random_labels,
    random_linear,
    run_script,
    tiny_lora_config,
    uninterrupted_and_resumed,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_plugins import ASFTConfig, ASFTTrainer, FusedSFTConfig, FusedSFTTrainer, asft_loss
from hf_plugins.losses import METHODS, ASFTMethod, dft_loss
from hf_plugins.ops import LossMethod, Targets, fused_linear_loss
from hf_plugins.testing import build_tiny_model, build_tokenizer, save_tiny_model, tiny_conversational_dataset


LOGGER = "hf_plugins.trainers.asft_trainer"


# ---------------------------------------------------------------------------------------------------------- helpers


def make_inputs(shape, V=37, D=8, D_ref=6, *, dtype=F64, bias=True, seed=0, ignore_frac=0.25):
    """Policy hidden [*shape, D], weight [V, D], bias [V]; a reference of another width (hidden [*shape, D_ref],
    weight [V, D_ref], bias [V]); labels with some -100. Every float tensor is a leaf that requires grad."""
    g = gen(seed)
    policy = as_leaves(*random_linear(g, shape, V, D, bias=bias), dtype=dtype)
    reference = as_leaves(*random_linear(g, shape, V, D_ref, bias=bias), dtype=dtype)
    labels = random_labels(g, shape, V, ignore_frac)
    return dict(zip(("hidden", "weight", "bias"), policy)), dict(zip(REFERENCE, reference)), labels


REFERENCE = ("ref_hidden", "ref_weight", "ref_bias")


def policy_leaves(policy):
    return leaves(*policy.values())


def fused(policy, reference, labels, kl_coef, backend, **kwargs):
    return fused_linear_loss(
        policy["hidden"],
        policy["weight"],
        labels,
        "asft",
        bias=policy["bias"],
        backend=backend,
        kl_coef=kl_coef,
        **reference,
        **kwargs,
    )


def expected(policy, reference, labels, kl_coef, num_items=None):
    """`asft_loss` on float64 materialised logits, and its gradients w.r.t. the policy's hidden, weight and bias."""
    h, w, b = (None if t is None else t.detach().to(F64).requires_grad_(True) for t in policy.values())
    ref_logits = logits_of(*(None if t is None else t.detach().to(F64) for t in reference.values()))
    loss = asft_loss(logits_of(h, w, b), ref_logits, labels, kl_coef=kl_coef, num_items_in_batch=num_items)
    return loss.detach(), torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None])


def assert_fused_matches(policy, reference, labels, kl_coef, backend, *, tol=1e-9, num_items=None, **kwargs):
    """The fused head equals `asft_loss` on float64 materialised logits, in value and in the policy's gradients; the
    reference is a constant of the loss (the functional side detaches it): no gradient reaches it, on any backend."""

    def fused_fn(h, w, b, ref_h, ref_w, ref_b):
        inputs = dict(zip(REFERENCE, (ref_h, ref_w, ref_b)))
        return fused(
            dict(hidden=h, weight=w, bias=b), inputs, labels, kl_coef, backend, num_items_in_batch=num_items, **kwargs
        )

    def functional_fn(h, w, b, ref_h, ref_w, ref_b):
        ref_logits = logits_of(ref_h, ref_w, ref_b).detach()
        return asft_loss(logits_of(h, w, b), ref_logits, labels, kl_coef=kl_coef, num_items_in_batch=num_items)

    got, _ = assert_matches(fused_fn, functional_fn, (*policy.values(), *reference.values()), rtol=tol, atol=tol)
    return got.loss, got.grads


# ------------------------------------------------------------------------------------ fused == asft_loss (float64)


def test_asft_is_registered():
    assert METHODS["asft"] is ASFTMethod


@pytest.mark.parametrize("shape", [(3, 7), (21,)], ids=["BTD", "ND"])
@pytest.mark.parametrize("num_items", [None, 40, "tensor"], ids=["mean", "int", "tensor"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_asft_loss_float64(backend, bias, num_items, shape):
    policy, reference, labels = make_inputs(shape, bias=bias, seed=len(shape))
    n = torch.tensor(40) if num_items == "tensor" else num_items
    assert_fused_matches(policy, reference, labels, 0.3, backend, num_items=n, chunk_size=4)


@pytest.mark.parametrize("kl_coef", [0.05, 1.0, 7.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_asft_loss_for_several_kl_coefs(backend, kl_coef):
    policy, reference, labels = make_inputs((2, 9), seed=3)
    assert_fused_matches(policy, reference, labels, kl_coef, backend, chunk_size=5)


EDGE_CASES = {
    "unsupervised-sequences": dict(
        shape=(4, 6), chunk=4, ignore=lambda y: y.index_fill_(0, torch.tensor([0, 2]), IGNORE)
    ),
    # 13 supervised rows in chunks of 4, over a vocabulary (37) that is a multiple of nothing
    "rows-not-multiple-of-chunk": dict(shape=(13,), chunk=4, ignore_frac=0.0),
    "chunk-1": dict(shape=(2, 5), chunk=1),
    "chunk-larger-than-N": dict(shape=(2, 5), chunk=1000),
    "single-row": dict(shape=(1, 1), chunk=3, ignore_frac=0.0),
    "tiny-vocab": dict(shape=(9,), V=2, chunk=4, ignore_frac=0.0),
}


@pytest.mark.parametrize("case", EDGE_CASES.values(), ids=EDGE_CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, case):
    policy, reference, labels = make_inputs(
        case["shape"], V=case.get("V", 37), seed=11, ignore_frac=case.get("ignore_frac", 0.25)
    )
    if "ignore" in case:
        labels = case["ignore"](labels)
    assert (labels != IGNORE).any()
    for num_items in (None, 50):
        _, grads = assert_fused_matches(
            policy, reference, labels, 0.2, backend, num_items=num_items, chunk_size=case["chunk"]
        )
        # unsupervised positions get exactly zero gradient
        assert torch.count_nonzero(grads[0][labels == IGNORE]) == 0


@pytest.mark.parametrize("num_items", [None, 8, "tensor0"], ids=["mean", "int", "tensor-zero"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_supervised_token_at_all(backend, num_items):
    policy, reference, labels = make_inputs((2, 4), seed=12)
    labels = torch.full_like(labels, IGNORE)
    n = torch.tensor(0) if num_items == "tensor0" else num_items
    loss, metrics = fused(
        policy, reference, labels, 0.1, backend, chunk_size=3, num_items_in_batch=n, return_metrics=True
    )
    grads = torch.autograd.grad(loss, policy_leaves(policy))
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(grad) == 0 for grad in grads)
    assert metrics["num_tokens"] == 0 and all(not math.isnan(value) for value in metrics.values())
    assert asft_loss(torch.randn(2, 4, 37), torch.randn(2, 4, 37), labels).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs_compute_in_float32(backend, dtype):
    policy, reference, labels = make_inputs((4, 16), V=53, D=16, D_ref=12, dtype=dtype, seed=13)
    loss = fused(policy, reference, labels, 0.1, backend, chunk_size=5)
    grads = torch.autograd.grad(loss, policy_leaves(policy))
    exp_loss, exp_grads = expected(policy, reference, labels, 0.1)
    assert loss.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert abs(loss.double() - exp_loss) <= tol * abs(exp_loss)
    for grad, exp in zip(grads, exp_grads):
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert (grad.double() - exp).norm() <= (2e-2 if dtype == torch.bfloat16 else 1e-5) * exp.norm()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_gives_the_same_loss(backend):
    policy, reference, labels = make_inputs((3, 5), seed=18)
    with torch.no_grad():
        plain = fused(policy, reference, labels, 0.1, backend, chunk_size=4)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, fused(policy, reference, labels, 0.1, backend, chunk_size=4).detach())


# ---------------------------------------------------------------------------------- identities of the objective


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_coef_zero_is_dft(backend):
    policy, reference, labels = make_inputs((3, 7), seed=4)
    loss = fused(policy, reference, labels, 0.0, backend, chunk_size=4)
    grads = torch.autograd.grad(loss, policy_leaves(policy))
    dft = fused_linear_loss(
        policy["hidden"], policy["weight"], labels, "dft", bias=policy["bias"], backend=backend, chunk_size=4
    )
    dft_grads = torch.autograd.grad(dft, policy_leaves(policy))
    torch.testing.assert_close(loss, dft, rtol=1e-12, atol=1e-12)
    for grad, exp in zip(grads, dft_grads):
        torch.testing.assert_close(grad, exp, rtol=1e-12, atol=1e-12)
    logits = logits_of(*policy.values()).detach()
    ref_logits = logits_of(*reference.values()).detach()
    torch.testing.assert_close(asft_loss(logits, ref_logits, labels, kl_coef=0.0), dft_loss(logits, labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_mask_leaves_dft_alone_where_the_reference_has_no_prediction(backend):
    """`ref_mask` False (the first token under prompt tuning, which only the policy's virtual tokens predict): DFT's
    term alone there. Every backend equals `asft_loss` with the mask in value, gradients and the `kl` metric, and
    `asft_loss` with the mask is ASFT on the anchored tokens plus DFT on the others."""
    policy, reference, labels = make_inputs((3, 7), seed=21, ignore_frac=0.2)
    ref_mask = torch.ones(labels.shape, dtype=torch.bool)
    ref_mask[:, 0] = False
    ref_mask[1, 4] = False
    labels[:, 0] = 5  # the masked positions are supervised
    labels[1, 4] = 7
    kl_coef = 0.7
    loss, metrics = fused(
        policy, reference, labels, kl_coef, backend, chunk_size=4, ref_mask=ref_mask, return_metrics=True
    )
    grads = torch.autograd.grad(loss, policy_leaves(policy))

    h, w, b = (t.detach().requires_grad_(True) for t in policy.values())
    logits, ref_logits = logits_of(h, w, b), logits_of(*(t.detach() for t in reference.values()))
    exp_loss = asft_loss(logits, ref_logits, labels, kl_coef=kl_coef, ref_mask=ref_mask)
    exp_grads = torch.autograd.grad(exp_loss, [h, w, b])
    torch.testing.assert_close(loss, exp_loss, rtol=1e-9, atol=1e-9)
    for grad, exp in zip(grads, exp_grads):
        torch.testing.assert_close(grad, exp, rtol=1e-9, atol=1e-9)

    count = int((labels != IGNORE).sum())
    logits = logits.detach()
    split = asft_loss(
        logits, ref_logits, labels.masked_fill(~ref_mask, IGNORE), kl_coef=kl_coef, num_items_in_batch=count
    ) + dft_loss(logits, labels.masked_fill(ref_mask, IGNORE), count)
    torch.testing.assert_close(exp_loss.detach(), split, rtol=1e-12, atol=1e-12)
    unmasked = asft_loss(logits, ref_logits, labels, kl_coef=kl_coef)
    assert abs(float(unmasked - exp_loss)) > 1e-3  # the mask really drops KL terms

    supervised = labels != IGNORE
    log_p, log_q = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    assert metrics["kl"] == pytest.approx(float(kl[supervised & ref_mask].sum()) / count, rel=1e-9)


def test_asft_loss_is_dft_plus_kl_div_as_the_official_code_writes_it():
    """The functional definition against an independent one: `kl_div(log_softmax(policy), softmax(ref))` summed over
    the vocabulary (the official code's direction, KL(ref || policy)), plus DFT, averaged over supervised tokens."""
    g = gen(5)
    logits, ref_logits = torch.randn(2, 6, 11, generator=g, dtype=F64), torch.randn(2, 6, 11, generator=g, dtype=F64)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = IGNORE
    mask = labels != IGNORE
    log_p = torch.log_softmax(logits, -1)[mask]
    kl = F.kl_div(log_p, torch.softmax(ref_logits, -1)[mask], reduction="none").sum(-1)
    log_p_y = log_p.gather(1, labels[mask].unsqueeze(1)).squeeze(1)
    expected_loss = (-log_p_y.exp() * log_p_y + 0.3 * kl).mean()
    loss = asft_loss(logits, ref_logits, labels, kl_coef=0.3)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [*BACKENDS, "functional"])
def test_logits_gradient_is_the_closed_form(backend):
    """`dl/dz = ((w + lambda) p - w e_y - lambda q) / N` with w = p(y): read off the fused head by making the lm_head
    the identity (hidden = logits), and off `asft_loss` directly."""
    V, kl_coef = 13, 0.7
    g = gen(6)
    z = (2 * torch.randn(12, V, generator=g, dtype=F64)).requires_grad_(True)
    ref_logits = 2 * torch.randn(12, V, generator=g, dtype=F64)
    labels = torch.randint(0, V, (12,), generator=g)
    labels[[1, 7]] = IGNORE
    if backend == "functional":
        loss = asft_loss(z, ref_logits, labels, kl_coef=kl_coef)
    else:
        eye = torch.eye(V, dtype=F64)
        loss = fused_linear_loss(
            z,
            eye,
            labels,
            "asft",
            backend=backend,
            chunk_size=5,
            ref_hidden=ref_logits,
            ref_weight=eye,
            kl_coef=kl_coef,
        )
    (grad,) = torch.autograd.grad(loss, [z])

    mask = labels != IGNORE
    p, q = torch.softmax(z.detach(), -1), torch.softmax(ref_logits, -1)
    e_y = F.one_hot(labels.clamp(min=0), V).to(F64)
    w = p.gather(1, labels.clamp(min=0).unsqueeze(1))
    closed = ((w + kl_coef) * p - w * e_y - kl_coef * q) / mask.sum()
    closed[~mask] = 0.0
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)


def test_metrics_are_kl_and_dft_weight_of_the_materialised_logits():
    policy, reference, labels = make_inputs((3, 9), V=29, seed=15)
    mask = labels != IGNORE
    log_p = torch.log_softmax(logits_of(*policy.values()).detach()[mask], -1)
    log_q = torch.log_softmax(logits_of(*reference.values()).detach()[mask], -1)
    p_y = log_p.gather(1, labels[mask].unsqueeze(1)).squeeze(1).exp()
    want = {"kl": (log_q.exp() * (log_q - log_p)).sum(-1).mean().item(), "dft_weight": p_y.mean().item()}
    for backend in BACKENDS:
        for kl_coef in (0.0, 0.4):  # the KL is reported even when it is not trained on
            _, metrics = fused(policy, reference, labels, kl_coef, backend, chunk_size=4, return_metrics=True)
            assert {"kl", "dft_weight", "token_accuracy", "entropy", "label_prob", "num_tokens"} <= set(metrics)
            for name, value in want.items():
                assert metrics[name] == pytest.approx(value, rel=1e-9), (backend, kl_coef, name)


def test_kl_is_exactly_zero_when_the_reference_is_the_policy():
    policy, _, labels = make_inputs((3, 9), D=8, seed=16, dtype=torch.float32)
    same = {f"ref_{name}": tensor.detach() for name, tensor in policy.items()}
    loss, metrics = fused(policy, same, labels, 0.5, "chunked", chunk_size=4, return_metrics=True)
    assert metrics["kl"] == 0.0
    # and the loss is then DFT's
    dft = fused_linear_loss(policy["hidden"], policy["weight"], labels, "dft", bias=policy["bias"], chunk_size=4)
    torch.testing.assert_close(loss, dft, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ memory and interface


def large_vocabulary_inputs():
    """Policy and reference inputs over a 20000-token vocabulary, chunked by 32 rows: (N, V, chunk, hidden, weight,
    ref_hidden, ref_weight, labels)."""
    N, V, D, chunk = 256, 20_000, 16, 32
    g = gen(17)
    hidden = torch.randn(N, D, generator=g).requires_grad_(True)
    weight = (0.1 * torch.randn(V, D, generator=g)).requires_grad_(True)
    ref_hidden, ref_weight = torch.randn(N, D, generator=g), 0.1 * torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    return N, V, chunk, hidden, weight, ref_hidden, ref_weight, labels


def test_chunked_never_holds_either_models_full_logits():
    N, V, chunk, hidden, weight, ref_hidden, ref_weight, labels = large_vocabulary_inputs()
    with LargestTensor() as mode:
        loss, _ = fused_linear_loss(
            hidden,
            weight,
            labels,
            "asft",
            backend="chunked",
            chunk_size=chunk,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            kl_coef=0.1,
            return_metrics=True,
        )
        torch.autograd.grad(loss, [hidden, weight])
    assert mode.largest <= chunk * V < N * V


def test_chunked_allocates_its_tiles_once_per_call():
    """The reference's logits, log-probs and probabilities go to two spare tiles the chunked backend keeps for the
    whole call: a call allocates four `[chunk, V]` tiles whatever its number of chunks."""
    N, V, chunk, hidden, weight, ref_hidden, ref_weight, labels = large_vocabulary_inputs()
    with LargestTensor() as mode:
        loss = fused_linear_loss(
            hidden, weight, labels, "asft", backend="chunked", chunk_size=chunk, ref_hidden=ref_hidden,
            ref_weight=ref_weight, kl_coef=0.1,
        )  # fmt: skip
        torch.autograd.grad(loss, [hidden, weight])
    assert sum(numel >= chunk * V for numel in mode.allocated) == 4


class ConstantMethod(LossMethod):
    """SFT plus a per-row constant: the value moves by the constant's mean, the gradient does not."""

    name = "sft-plus-constant"

    def targets(self, chunk):
        return Targets(
            index=chunk.labels.unsqueeze(-1),
            value=torch.ones_like(chunk.label_log_probs).unsqueeze(-1),
            constant=torch.arange(chunk.labels.numel(), dtype=chunk.log_probs.dtype) + chunk.rows.start,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_constant_shifts_the_value_not_the_gradient(backend):
    policy, _, labels = make_inputs((14,), seed=19, ignore_frac=0.0)
    args = (policy["hidden"], policy["weight"], labels)
    if backend == "triton":
        # a method without a kernel form is refused by name, never silently run another way
        with pytest.raises(ValueError, match="sft-plus-constant.*no Triton kernel form.*'chunked'"):
            fused_linear_loss(*args, ConstantMethod(), bias=policy["bias"], backend=backend, chunk_size=4)
        return
    plain = fused_linear_loss(*args, "sft", bias=policy["bias"], backend=backend, chunk_size=4)
    shifted = fused_linear_loss(*args, ConstantMethod(), bias=policy["bias"], backend=backend, chunk_size=4)
    torch.testing.assert_close(shifted - plain, torch.tensor(sum(range(14)) / 14, dtype=F64))
    plain_grads = torch.autograd.grad(plain, policy_leaves(policy))
    for a, b in zip(plain_grads, torch.autograd.grad(shifted, policy_leaves(policy))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _bad(**overrides):
    g = gen(20)
    call = dict(
        hidden=torch.randn(2, 5, 8, generator=g),
        weight=torch.randn(37, 8, generator=g),
        labels=torch.randint(0, 37, (2, 5), generator=g),
        ref_hidden=torch.randn(2, 5, 6, generator=g),
        ref_weight=torch.randn(37, 6, generator=g),
        kl_coef=0.1,
    )
    call.update(overrides)
    call = {key: value for key, value in call.items() if value is not None}
    return lambda: fused_linear_loss(call.pop("hidden"), call.pop("weight"), call.pop("labels"), "asft", **call)


BAD_INPUTS = {
    "kl-negative": (dict(kl_coef=-0.1), r"`kl_coef` must be a finite number >= 0"),
    "kl-nan": (dict(kl_coef=float("nan")), r"`kl_coef` must be a finite number >= 0"),
    "kl-inf": (dict(kl_coef=float("inf")), r"`kl_coef` must be a finite number >= 0"),
    "kl-str": (dict(kl_coef="0.1"), r"`kl_coef` must be a number"),
    "kl-bool": (dict(kl_coef=True), r"`kl_coef` must be a number"),
    "no-ref-hidden": (dict(ref_hidden=None), r"'asft' needs `ref_hidden`"),
    "no-ref-weight": (dict(ref_weight=None), r"'asft' needs `ref_hidden`.*`ref_weight`"),
    "ref-vocab": (dict(ref_weight=torch.randn(36, 6)), r"`ref_weight` has shape \(36, 6\).*V = 37"),
    "ref-weight-1d": (dict(ref_weight=torch.randn(37)), r"`ref_weight` has shape \(37,\)"),
    "ref-bias": (dict(ref_bias=torch.randn(36)), r"`ref_bias` has shape \(36,\)"),
    "ref-hidden-positions": (
        dict(ref_hidden=torch.randn(2, 4, 6)),
        r"`ref_hidden` has shape \(2, 4, 6\).*\(2, 5, 6\)",
    ),
    "ref-hidden-width": (dict(ref_hidden=torch.randn(2, 5, 7)), r"`ref_hidden` has shape \(2, 5, 7\)"),
    "unknown-input": (dict(temperature=1.0), r"'asft' got an unexpected input.*temperature"),
}


def test_valid_call_used_by_bad_input_cases_works():
    assert torch.isfinite(_bad()())


@pytest.mark.parametrize("overrides, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _bad(**overrides)()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(kl_coef=float("nan")), "kl_coef"),
        (dict(ref_logits=torch.randn(2, 5, 36)), r"`ref_logits` has shape \(2, 5, 36\)"),
    ],
)
def test_asft_loss_bad_inputs_raise(kwargs, match):
    call = dict(
        logits=torch.randn(2, 5, 37), ref_logits=torch.randn(2, 5, 37), labels=torch.zeros(2, 5, dtype=torch.long)
    )
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        asft_loss(**call)


def test_a_misspelt_input_group_is_an_error():
    from hf_plugins.modeling import LossHead

    with pytest.raises(TypeError, match="hiden_inputs"):
        LossHead(method="asft", **{"hiden_inputs": {}})


# ---------------------------------------------------------------------------------------------------- the config


ASFT_ARGS = dict(CPU_ARGS, lr_scheduler_type="constant", assistant_only_loss=True)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"kl_coef": -0.01}, "kl_coef"),
        ({"kl_coef": float("nan")}, "kl_coef"),
        ({"kl_coef": float("inf")}, "kl_coef"),
        ({"loss_type": "dft"}, "loss_type"),
        ({"ref_model": ""}, "ref_model"),
        ({"ref_model_init_kwargs": "not-json"}, "ref_model_init_kwargs"),
    ],
)
def test_bad_config_values_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        ASFTConfig(output_dir=str(tmp_path), **{**ASFT_ARGS, **overrides})


def test_config_defaults_and_json_init_kwargs(tmp_path):
    config = ASFTConfig(output_dir=str(tmp_path), **ASFT_ARGS, ref_model_init_kwargs='{"dtype": "float32"}')
    assert config.kl_coef == 0.05 and config.ref_model is None and config.loss_type == "nll"
    assert config.ref_model_init_kwargs == {"dtype": "float32"}
    assert isinstance(config, FusedSFTConfig)


# -------------------------------------------------------------------------------------------------- the trainer


def make_trainer(
    model_dir,
    tmp_path,
    *,
    peft_config=None,
    ref_model=None,
    config_ref_model=None,
    cls=ASFTTrainer,
    config_cls=ASFTConfig,
    **overrides,
):
    """`ref_model` is the trainer argument, `config_ref_model` the `ASFTConfig` field."""
    args = {**ASFT_ARGS, "max_steps": 4, **overrides}
    if config_ref_model is not None:
        args["ref_model"] = config_ref_model
    return testing_utils.make_trainer(
        cls,
        config_cls,
        model_dir,
        tmp_path / "out",
        tiny_conversational_dataset(16),
        peft_config=peft_config,
        init_seed=0,  # the same LoRA initialisation in every trainer of a test
        trainer_kwargs={"ref_model": ref_model} if cls is ASFTTrainer else None,
        **args,
    )


def lora(modules_to_save=None):
    return tiny_lora_config(target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=modules_to_save)


def assert_kl_starts_at_zero_and_grows(trainer):
    kl = logged(trainer, "kl")
    assert len(kl) == trainer.args.max_steps
    assert kl[0] == pytest.approx(0.0, abs=1e-7)  # step 1 is scored before any update: policy == reference
    assert all(value > 0 for value in kl[1:]) and kl[-1] > kl[1], kl
    assert all(math.isfinite(x) for x in logged(trainer))
    for key in ("dft_weight", "mean_token_accuracy", "entropy"):
        assert len(logged(trainer, key)) == len(kl)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_full_finetuning_with_accumulation_uses_a_frozen_copy(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    trainer = make_trainer(tiny_model_dir, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert any("frozen copy of the starting model" in r.message and "MiB" in r.message for r in caplog.records)
    reference = trainer.ref_model
    policy_storage = {p.data_ptr() for p in trainer.model.parameters()}
    assert not any(p.data_ptr() in policy_storage for p in reference.parameters())
    before, policy_before = snapshot(reference), snapshot(trainer.model)
    trainer.train()
    assert_kl_starts_at_zero_and_grows(trainer)
    assert not reference.training and all(not p.requires_grad for p in reference.parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, policy_before[name]) for name, p in trainer.model.named_parameters())
    # evaluation scores the reference too
    assert trainer.evaluate(tiny_conversational_dataset(4))["eval_kl"] > 0


def test_lora_with_accumulation_uses_the_adapters_off_model(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, peft_config=lora(), per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    assert trainer.ref_model is None
    base_before = {name: p for name, p in snapshot(trainer.model).items() if "lora_" not in name}
    trainer.train()
    assert_kl_starts_at_zero_and_grows(trainer)
    for name, p in trainer.model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]) and not p.requires_grad, name


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["lora", "lora+lm_head"])
def test_adapters_off_reference_equals_a_frozen_copy_of_the_base_model(
    tiny_model_dir, tmp_path, caplog, modules_to_save
):
    """Same LoRA run twice: reference = the adapters-off policy, or the base checkpoint loaded as `ref_model` (which
    is allowed with PEFT, but logged). Identical losses and KL at every step, once the adapters have moved."""
    adapters_off = make_trainer(tiny_model_dir, tmp_path / "a", peft_config=lora(modules_to_save), max_steps=3)
    assert not [r for r in caplog.records if r.name == LOGGER]
    adapters_off.train()
    frozen_copy = make_trainer(
        tiny_model_dir, tmp_path / "b", peft_config=lora(modules_to_save), ref_model=tiny_model_dir, max_steps=3
    )
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "given with a PEFT policy" in r.message]
    assert len(warned) == 1
    frozen_copy.train()
    assert logged(adapters_off, "kl")[-1] > 0
    for key in ("loss", "kl", "dft_weight"):
        assert logged(frozen_copy, key) == pytest.approx(logged(adapters_off, key), rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("checkpointing_kwargs", [None, {"use_reentrant": True}], ids=["default", "reentrant"])
def test_gradient_checkpointing_with_the_adapters_off_reference(tiny_model_dir, tmp_path, checkpointing_kwargs):
    """TRL turns gradient checkpointing on by default: the no-grad reference forward runs through the checkpointed
    layers (still in training mode) and changes nothing."""
    runs = []
    for checkpointing in (False, True):
        trainer = make_trainer(
            tiny_model_dir,
            tmp_path / str(checkpointing),
            peft_config=lora(),
            max_steps=3,
            learning_rate=5e-2,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
        trainer.train()
        runs.append(logged(trainer) + logged(trainer, "kl"))
    assert runs[0][-1] > 0
    assert runs[1] == pytest.approx(runs[0], abs=1e-7)


@pytest.mark.parametrize("lora_dropout", [None, CLI_LORA_DROPOUT], ids=["full", "lora-dropout"])
def test_resume_from_checkpoint_continues_the_run(tiny_model_dir, tmp_path, lora_dropout):
    """Full fine-tuning (a frozen copy as reference) or LoRA with dropout (the adapters-off reference): the resumed
    run's losses and KL are the uninterrupted run's."""

    def make(output_dir, **overrides):
        peft_config = None if lora_dropout is None else tiny_lora_config(lora_dropout)
        return make_trainer(tiny_model_dir, output_dir, peft_config=peft_config, learning_rate=2e-2, **overrides)

    full, resumed, _ = uninterrupted_and_resumed(make, tmp_path)
    assert len(logged(resumed)) == 4
    for key in ("loss", "kl"):
        assert logged(resumed, key)[2:] == pytest.approx(logged(full, key)[2:], abs=1e-6), key
    assert logged(full, "kl")[-1] > 0


def test_every_reference_source_gives_the_same_run(tiny_model_dir, tmp_path):
    """A frozen copy (default), a path and a model object holding the starting weights are the same reference; each
    is frozen, in eval mode and unchanged by training."""
    runs = {}
    for source in ("copy", "path", "object"):
        ref_model = {
            "copy": None,
            "path": tiny_model_dir,
            "object": AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        }[source]
        trainer = make_trainer(tiny_model_dir, tmp_path / source, ref_model=ref_model, max_steps=3)
        before = snapshot(trainer.ref_model)
        trainer.train()
        assert not trainer.ref_model.training
        for name, p in trainer.ref_model.named_parameters():
            assert not p.requires_grad and torch.equal(p, before[name]), (source, name)
        runs[source] = logged(trainer) + logged(trainer, "kl")
    assert runs["copy"][-1] > 0
    assert runs["path"] == pytest.approx(runs["copy"], abs=1e-7)
    assert runs["object"] == pytest.approx(runs["copy"], abs=1e-7)


def test_kl_coef_zero_trains_like_dft(tiny_model_dir, tmp_path):
    asft = make_trainer(tiny_model_dir, tmp_path / "asft", kl_coef=0.0, max_steps=3)
    asft.train()
    dft = make_trainer(
        tiny_model_dir, tmp_path / "dft", cls=FusedSFTTrainer, config_cls=FusedSFTConfig, loss_type="dft", max_steps=3
    )
    dft.train()
    assert logged(asft) == pytest.approx(logged(dft), abs=1e-7)
    assert logged(asft, "kl")[-1] > 0  # the drift is still measured


def test_gradient_accumulation_4x1_equals_1x4(tiny_model_dir, tmp_path):
    runs = []
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer = make_trainer(
            tiny_model_dir,
            tmp_path / f"{batch}x{accumulation}",
            max_steps=3,
            kl_coef=0.5,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        runs.append((trainer, logged(trainer)))
    assert runs[1][1] == pytest.approx(runs[0][1], abs=1e-6)
    assert_same_parameters(runs[0][0], runs[1][0])


@pytest.mark.parametrize(
    "batching, peft",
    [("packing", False), ("padding_free", False), ("packing", True)],
    ids=["packing", "padding_free", "packing-lora"],
)
def test_packed_and_padding_free_training_equal_padded_training(tiny_model_dir, tmp_path, batching, peft):
    """One full batch a step, so both runs train on the same tokens: packed (`bfd`, several sequences a row, all
    flattened into one padding-free row) or padding-free, the reference (a frozen copy, or the adapters-off policy)
    must see the policy's sequence boundaries (`position_ids`, no attention mask)."""
    settings = dict(
        per_device_train_batch_size=16,
        optim="sgd",
        learning_rate=50.0,
        kl_coef=1.0,
        max_steps=3,
        peft_config=lora() if peft else None,
    )
    padded = make_trainer(tiny_model_dir, tmp_path / "padded", **settings)
    flat = dict(packing=True, max_length=256) if batching == "packing" else dict(padding_free=True, max_length=None)
    packed = make_trainer(tiny_model_dir, tmp_path / batching, **settings, **flat)
    assert_packed_rows(padded, packed, batching == "packing", fewer_than=16)
    batch = next(iter(packed.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch and "cu_seq_lens_q" in batch
    before = [p.detach().clone() for p in padded.model.parameters()]
    for trainer in (padded, packed):
        trainer.train()
    assert logged(packed, "kl")[0] == pytest.approx(0.0, abs=1e-7) and logged(packed, "kl")[-1] > 0
    for key in ("loss", "kl", "dft_weight"):
        assert logged(packed, key) == pytest.approx(logged(padded, key), rel=1e-4, abs=1e-7), key
    assert max((p - q).abs().max() for p, q in zip(padded.model.parameters(), before)) > 1e-3
    assert_same_parameters(padded, packed)


def test_wrapped_packing_at_kl_zero_trains_like_stock_dft(tiny_model_dir, tmp_path):
    """`wrapped` rows mix sequences (they attend to each other, as in stock TRL): no padded run is the same, but
    stock `SFTTrainer` with `loss_type="dft"` on the same packing is; and the anchor starts at 0 there too."""
    from trl import SFTConfig, SFTTrainer

    settings = dict(
        packing=True, packing_strategy="wrapped", max_length=64, optim="sgd", learning_rate=50.0, max_steps=3
    )
    asft = make_trainer(tiny_model_dir, tmp_path / "asft", kl_coef=0.0, **settings)
    asft.train()
    stock = make_trainer(
        tiny_model_dir, tmp_path / "stock", cls=SFTTrainer, config_cls=SFTConfig, loss_type="dft", **settings
    )
    stock.train()
    assert logged(asft) == pytest.approx(logged(stock), rel=1e-5)
    assert_same_parameters(stock, asft)
    anchored = make_trainer(tiny_model_dir, tmp_path / "anchored", kl_coef=1.0, **settings)
    anchored.train()
    assert logged(anchored, "kl")[0] == pytest.approx(0.0, abs=1e-7) and logged(anchored, "kl")[-1] > 1e-4


def test_bad_references_raise_before_training(tiny_model_dir, tmp_path):
    # a checkpoint whose tokenizer has the policy's size but other ids
    other_ids = save_tiny_model(tmp_path / "other-ids", tokenizer_seed=1)
    with pytest.raises(ValueError, match="different tokenizer"):
        make_trainer(tiny_model_dir, tmp_path, ref_model=other_ids)
    # a checkpoint (no tokenizer saved) and a model object with a smaller vocabulary
    small = build_tiny_model(build_tokenizer(vocab_size=320))
    small.save_pretrained(tmp_path / "small-vocab")
    for ref_model in (str(tmp_path / "small-vocab"), small):
        with pytest.raises(ValueError, match="reference model scores 320 tokens but the policy scores 384"):
            make_trainer(tiny_model_dir, tmp_path, ref_model=ref_model)
    # conflicting or pointless reference arguments
    with pytest.raises(ValueError, match="`ref_model_init_kwargs` is set"):
        make_trainer(tiny_model_dir, tmp_path, ref_model_init_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="Both the `ref_model` argument and `args.ref_model"):
        make_trainer(tiny_model_dir, tmp_path, ref_model=small, config_ref_model=str(tmp_path / "small-vocab"))


def test_ref_model_from_the_config_and_the_same_object_refusal(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, config_ref_model=tiny_model_dir)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="keyword argument `ref_model=`"):
        ASFTTrainer(model, AutoModelForCausalLM.from_pretrained(tiny_model_dir))  # DPOTrainer's positional order
    with pytest.raises(ValueError, match="same object"):
        ASFTTrainer(
            model=model,
            args=ASFTConfig(output_dir=str(tmp_path), **ASFT_ARGS),
            ref_model=model,
            train_dataset=tiny_conversational_dataset(4),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        )


# --------------------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hf_plugins import ASFTConfig, ASFTTrainer
    from hf_plugins.testing import CPU_TRAINING_ARGS, tiny_conversational_dataset

    model_dir, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = ASFTConfig(output_dir=out, max_steps=3, per_device_train_batch_size=batch, gradient_accumulation_steps=2,
                      learning_rate=5e-2, assistant_only_loss=True, kl_coef=0.5, **CPU_TRAINING_ARGS)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                      task_type="CAUSAL_LM")
    trainer = ASFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, peft_config=peft,
                          train_dataset=tiny_conversational_dataset(32),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    if trainer.accelerator.is_main_process:
        logs = [[h["loss"], h["kl"]] for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(out, "logs.json"), "w") as handle:
            json.dump({"world": trainer.accelerator.num_processes, "logs": logs}, handle)
""")


@pytest.mark.slow
def test_ddp_adapters_off_reference_matches_one_process(tiny_model_dir, tmp_path):
    """2 CPU processes x batch 2 == 1 process x batch 4: the adapters-off reference forward goes through the DDP
    wrapper (twice per step, once under no_grad) without upsetting its gradient synchronisation."""
    script = tmp_path / "train_asft.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for name, launcher, batch in (("ddp", TORCHRUN, 2), ("single", [sys.executable], 4)):
        out = tmp_path / name
        out.mkdir()
        run_script([*launcher, script, tiny_model_dir, out, batch])
        results[name] = json.loads((out / "logs.json").read_text())
    assert results["ddp"]["world"] == 2 and results["single"]["world"] == 1
    assert results["ddp"]["logs"][-1][1] > 0
    flat = {name: [value for step in result["logs"] for value in step] for name, result in results.items()}
    assert flat["ddp"] == pytest.approx(flat["single"], rel=1e-5, abs=1e-7)
