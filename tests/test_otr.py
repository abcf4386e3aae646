"""OTR (One-Token Rollout): the functional loss, the fused `"otr"` method and `OTRTrainer`.

The fused head must draw the same samples as `otr_loss` for the same generator state and equal it in value and
gradients (float64, both backends); the exact-expectation mode must equal its closed form and, at tau = 1, be
(1 - beta) x DFT in gradient; the Monte-Carlo gradient must be an unbiased estimate of the exact one whose error
shrinks like 1/sqrt(#draws); and the trainer must train, and resume on the same sample stream.
"""

import math
import os
import shutil
from functools import partial

import pytest
import testing_utils
import torch
from testing_utils import (
    BACKENDS,
    CLI_LORA_DROPOUT,
    CPU_ARGS,
    F64,
    IGNORE,
    LargestTensor,
    assert_matches,
    assert_same_parameters,
    checkpointed_with_evaluation,
    float64_copies,
    gen,
    logged,
    logits_of,
    loss_and_grads,
    make_inputs,
    tiny_lora_config,
    train_and_list_changed_parameters,
    uninterrupted_and_resumed,
)
from transformers import HfArgumentParser

from hf_plugins import OTRConfig, OTRTrainer, dft_loss, otr_loss
from hf_plugins.losses import METHODS, OTRMethod
from hf_plugins.losses.otr import draw_uniforms, sample_tokens
from hf_plugins.ops import fused_linear_loss
from hf_plugins.ops.method import Chunk, Rows, chunk_inputs
from hf_plugins.testing import tiny_conversational_dataset


TAU, BETA = 1.3, -0.2  # away from the defaults, so a default silently used instead of the argument shows


# ---------------------------------------------------------------------------------------------------------- helpers


def functional_fn(labels, generator, num_items=None, **settings):
    """`otr_loss` on the materialised logits, as a function of (hidden, weight, bias)."""
    return lambda h, w, b: otr_loss(
        logits_of(h, w, b), labels, generator=generator, num_items_in_batch=num_items, **settings
    )


def fused_fn(labels, backend, generator, chunk_size=4, **kwargs):
    """The fused head (loss, metrics) as a function of (hidden, weight, bias)."""
    return lambda h, w, b: fused_linear_loss(
        h,
        w,
        labels,
        "otr",
        bias=b,
        backend=backend,
        chunk_size=chunk_size,
        generator=generator,
        return_metrics=True,
        **kwargs,
    )


def functional_loss_and_grads(hidden, weight, bias, labels, generator, num_items=None, **settings):
    """`otr_loss` on float64 materialised logits and its gradients w.r.t. hidden, weight and bias."""
    inputs = float64_copies((hidden, weight, bias))
    return loss_and_grads(functional_fn(labels, generator, num_items, **settings), inputs)[:2]


def fused_loss_and_grads(hidden, weight, bias, labels, backend, generator, chunk_size=4, **kwargs):
    """The fused loss, its gradients w.r.t. hidden, weight and bias, and its metrics."""
    return loss_and_grads(fused_fn(labels, backend, generator, chunk_size, **kwargs), (hidden, weight, bias))


def settings(num_samples):
    return dict(num_samples=num_samples, temperature=TAU, negative_reward=BETA)


# ------------------------------------------------------------------------------- fused head == functional loss


@pytest.mark.parametrize("shape", [(3, 7), (21,)], ids=["BTD", "ND"])
@pytest.mark.parametrize("num_items", [None, 40], ids=["mean", "n"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_samples", [1, 8, None], ids=["K1", "K8", "exact"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_functional_float64(backend, num_samples, bias, num_items, shape):
    hidden, weight, b, labels = make_inputs(shape, bias=bias, seed=len(shape))
    g_fused, g_functional = gen(7), gen(7)
    got, _ = assert_matches(
        fused_fn(labels, backend, g_fused, num_items_in_batch=num_items, **settings(num_samples)),
        functional_fn(labels, g_functional, num_items, **settings(num_samples)),
        (hidden, weight, b),
        rtol=1e-9,
        atol=1e-12,
    )
    # both drew the same amount from their generators: the streams stay in step call after call
    assert torch.equal(g_fused.get_state(), g_functional.get_state())
    # and the loss is not trivially zero
    assert got.loss.abs() > 1e-3


def test_same_samples_on_every_backend_and_in_the_functional_loss():
    """The sampled tokens themselves, not only the loss: the hit rate of the 640 samples is the same on both backends
    and at every chunk size as the sampler's on the materialised logits."""
    hidden, weight, b, labels = make_inputs((40,), V=6, seed=3, ignore_frac=0.0)
    logits = (hidden @ weight.t() + b).detach()
    samples = sample_tokens(torch.log_softmax(logits, -1), draw_uniforms(40, 16, gen(5), "cpu"), TAU)
    expected_hit_rate = (samples == labels.unsqueeze(-1)).double().mean().item()
    assert 0.05 < expected_hit_rate < 0.95
    for backend in BACKENDS:
        for chunk in (1, 7, 64):
            _, _, metrics = fused_loss_and_grads(hidden, weight, b, labels, backend, gen(5), chunk, **settings(16))
            assert metrics["hit_rate"] == pytest.approx(expected_hit_rate, abs=1e-12), (backend, chunk)


def test_recomputing_a_tile_reuses_the_samples():
    """`prepare` draws the uniforms once per call; a tile computed again (a recomputing backend, a checkpointed
    chunk) gets the same tokens, and the generator is not touched again."""
    logits = torch.randn(9, 50, dtype=F64, generator=gen(0))
    labels = torch.randint(0, 50, (9,), generator=gen(1))
    method = OTRMethod(num_samples=32, temperature=TAU, negative_reward=BETA)
    g = gen(11)

    rows = Rows(
        labels=labels,
        mask=torch.ones(9, dtype=torch.bool),
        sequence_index=torch.zeros_like(labels),
        num_sequences=1,
        label_log_probs=lambda: None,
    )
    inputs = method.prepare(rows, generator=g)
    state_after_prepare = g.get_state()
    log_probs = torch.log_softmax(logits, -1)

    def chunk(rows_slice):
        return Chunk(
            log_probs=log_probs[rows_slice],
            probs=log_probs[rows_slice].exp(),
            labels=labels[rows_slice],
            label_log_probs=log_probs[rows_slice].gather(1, labels[rows_slice, None])[:, 0],
            rows=rows_slice,
            inputs=chunk_inputs(inputs, rows_slice),
        )

    first = method.targets(chunk(slice(2, 7)))
    again = method.targets(chunk(slice(2, 7)))
    assert torch.equal(first.index, again.index) and torch.equal(first.value, again.value)
    assert torch.equal(g.get_state(), state_after_prepare)
    # the rows of a tile sample the same tokens whatever tile they are in
    whole = method.targets(chunk(slice(0, 9)))
    assert torch.equal(whole.index[2:7], first.index)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sampler_never_draws_a_token_of_probability_zero(dtype):
    """Zero-mass tokens at the start, in the middle and at the end of the vocabulary, and uniforms at both ends of
    [0, 1): every sample lands on a token of positive probability, with the right frequencies in between."""
    probs = torch.tensor([0.0, 0.2, 0.0, 0.0, 0.5, 0.3, 0.0], dtype=dtype)
    log_probs = probs.log().expand(3, -1)
    uniforms = torch.tensor([[0.0], [0.5], [1 - 2**-24]]).expand(3, 4).contiguous()
    samples = sample_tokens(log_probs, uniforms, 1.0)
    assert (probs[samples] > 0).all()
    assert samples[0, 0] == 1 and samples[2, 0] == 5  # the first and the last token of positive mass
    draws = sample_tokens(probs.log().expand(20000, -1), draw_uniforms(20000, 1, gen(0), "cpu"), 1.0)
    frequencies = torch.bincount(draws[:, 0], minlength=7).to(dtype) / 20000
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)


def test_generator_seed_decides_the_samples():
    hidden, weight, b, labels = make_inputs((5, 6), seed=4)

    def loss(generator):
        return fused_linear_loss(hidden, weight, labels, "otr", bias=b, generator=generator, **settings(4)).item()

    assert loss(gen(1)) == loss(gen(1))
    assert loss(gen(1)) != loss(gen(2))
    # without a generator the global RNG decides, so torch.manual_seed makes it reproducible
    torch.manual_seed(3)
    first = loss(None)
    torch.manual_seed(3)
    assert loss(None) == first
    # and a method object's generator is used when the call passes none
    by_object = fused_linear_loss(hidden, weight, labels, OTRMethod(4, TAU, BETA, generator=gen(1)), bias=b).item()
    assert by_object == loss(gen(1))


# -------------------------------------------------------------------------------------------------- edge cases

EDGE_CASES = {
    # V = 37 and 13 supervised rows: neither is a multiple of the chunk of 5 rows
    "rows-and-vocab-not-multiple-of-chunk": dict(shape=(13,), V=37, chunk=5, ignore_frac=0.0),
    "unsupervised-sequences": dict(shape=(4, 6), chunk=4, ignore_rows=[0, 2]),
    "single-row": dict(shape=(1,), chunk=4, ignore_frac=0.0),
    "chunk-larger-than-N": dict(shape=(2, 5), chunk=1000),
    "chunk-1": dict(shape=(2, 5), chunk=1),
    "tiny-vocab": dict(shape=(9,), V=2, chunk=4, ignore_frac=0.0),
}


@pytest.mark.parametrize("case", EDGE_CASES.values(), ids=EDGE_CASES.keys())
@pytest.mark.parametrize("num_samples", [3, None], ids=["K3", "exact"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, num_samples, case):
    hidden, weight, b, labels = make_inputs(
        case["shape"], V=case.get("V", 37), seed=9, ignore_frac=case.get("ignore_frac", 0.25)
    )
    if "ignore_rows" in case:
        labels[case["ignore_rows"]] = IGNORE
    assert (labels != IGNORE).any()
    got, _ = assert_matches(
        fused_fn(labels, backend, gen(2), case["chunk"], **settings(num_samples)),
        functional_fn(labels, gen(2), **settings(num_samples)),
        (hidden, weight, b),
        rtol=1e-9,
        atol=1e-12,
    )
    assert torch.count_nonzero(got.grads[0][labels == IGNORE]) == 0


@pytest.mark.parametrize("num_items", [None, 0, 8])
@pytest.mark.parametrize("num_samples", [3, None], ids=["K3", "exact"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_supervised_token_at_all(backend, num_samples, num_items):
    hidden, weight, b, labels = make_inputs((2, 4), seed=12)
    labels = torch.full_like(labels, IGNORE)
    g = gen(0)
    before = g.get_state()
    loss, grads, metrics = fused_loss_and_grads(
        hidden, weight, b, labels, backend, g, 3, num_items_in_batch=num_items, **settings(num_samples)
    )
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(grad) == 0 for grad in grads)
    assert metrics["num_tokens"] == 0 and all(value == value for value in metrics.values())
    assert torch.equal(g.get_state(), before)  # nothing to sample, nothing drawn
    logits = (hidden @ weight.t() + b).detach()
    assert otr_loss(logits, labels, generator=gen(0), **settings(num_samples)).item() == 0.0


# --------------------------------------------------------------------------------------- exact-expectation mode


@pytest.mark.parametrize("beta", [BETA, 0.0, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_expectation_equals_closed_form(backend, beta):
    hidden, weight, b, labels = make_inputs((3, 7), seed=13)
    mask = labels != IGNORE
    logits = (hidden @ weight.t() + b).detach()[mask].requires_grad_(True)
    y = labels[mask]
    # closed form: w[v] = softmax(z/tau)[v] * R(v, y), loss = -mean_t sum_v w log p, dl/dz = (sum w) p - w
    log_p = torch.log_softmax(logits, -1)
    reward = torch.full_like(logits, beta).scatter_(1, y[:, None], 1.0)
    w = torch.softmax(logits.detach() / TAU, -1) * reward
    expected_loss = -(w * log_p).sum() / len(y)
    expected_grad_logits = (w.sum(-1, keepdim=True) * log_p.detach().exp() - w) / len(y)

    (grad_logits,) = torch.autograd.grad(
        otr_loss(logits, y, num_samples=None, temperature=TAU, negative_reward=beta), [logits]
    )
    torch.testing.assert_close(grad_logits, expected_grad_logits, rtol=1e-10, atol=1e-13)

    loss, grads, metrics = fused_loss_and_grads(
        hidden, weight, b, labels, backend, None, num_samples=None, temperature=TAU, negative_reward=beta
    )
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-10, atol=1e-13)
    # chain rule through logits = h W^T + b
    h, W = hidden.detach()[mask], weight.detach()
    torch.testing.assert_close(grads[0][mask], expected_grad_logits @ W, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1], expected_grad_logits.t() @ h, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[2], expected_grad_logits.sum(0), rtol=1e-9, atol=1e-12)
    # the hit rate is its expectation: the tempered probability of the label
    tempered_label = torch.softmax(logits.detach() / TAU, -1).gather(1, y[:, None]).mean().item()
    assert metrics["hit_rate"] == pytest.approx(tempered_label, rel=1e-10)
    assert "no_hit_fraction" not in metrics


@pytest.mark.parametrize("beta", [-0.1, 0.0, 0.5])
def test_exact_expectation_at_tau_1_is_scaled_dft(beta):
    """sum_v pi_v grad log pi_v = 0, so at tau = 1: grad = (1 - beta) x DFT's gradient (values differ)."""
    hidden, weight, b, labels = make_inputs((4, 6), seed=14)
    otr = dict(num_samples=None, temperature=1.0, negative_reward=beta)
    logits = (hidden @ weight.t() + b).detach().requires_grad_(True)
    (g_otr,) = torch.autograd.grad(otr_loss(logits, labels, **otr), [logits])
    (g_dft,) = torch.autograd.grad(dft_loss(logits, labels), [logits])
    assert g_dft.abs().max() > 1e-3
    torch.testing.assert_close(g_otr, (1 - beta) * g_dft, rtol=1e-10, atol=1e-13)
    for backend in BACKENDS:
        _, fused, _ = fused_loss_and_grads(hidden, weight, b, labels, backend, None, **otr)
        dft = torch.autograd.grad(
            fused_linear_loss(hidden, weight, labels, "dft", bias=b, backend=backend, chunk_size=4),
            [hidden, weight, b],
        )
        for g_o, g_d in zip(fused, dft):
            torch.testing.assert_close(g_o, (1 - beta) * g_d, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------- Monte-Carlo behaviour


@pytest.mark.parametrize("num_samples", [1, 8])
def test_monte_carlo_gradient_converges_to_exact_like_one_over_sqrt_draws(num_samples):
    """Averaged over n independent draws, the MC logits-gradient is an unbiased estimate of the exact-expectation
    gradient whose error has the analytic size sqrt(tr Cov_K / n), with Cov_K = Cov_1 / K.

    The draws are vectorised: the same logits are repeated S times along a batch axis and one call samples every
    copy; the gradient w.r.t. copy s is draw s's gradient. The error at n draws is the RMS over the S / n disjoint
    blocks of n draws, which makes the check tight (over 80 seeds the ratio to the analytic value stayed within
    [0.85, 1.13] and the slope within 0.035 of -1/2)."""
    T, V, S = 6, 11, 32768
    g = gen(100 + num_samples)
    z = 1.5 * torch.randn(T, V, generator=g, dtype=F64)
    y = torch.randint(0, V, (T,), generator=g)
    otr = dict(temperature=TAU, negative_reward=BETA)

    exact_z = z.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(otr_loss(exact_z, y, num_samples=None, **otr), [exact_z])

    copies = z.expand(S, T, V).clone().requires_grad_(True)
    # num_items_in_batch=T: the sum over copies of each copy's mean over its T positions
    loss = otr_loss(copies, y.expand(S, T), num_samples=num_samples, generator=g, num_items_in_batch=T, **otr)
    (per_draw,) = torch.autograd.grad(loss, [copies])  # [S, T, V]

    # analytic covariance trace of one draw: X = R(a) (p - e_a) per row with a ~ softmax(z / tau), averaged over K
    # samples and over the T rows
    p, tempered = torch.softmax(z, -1), torch.softmax(z / TAU, -1)
    reward = torch.full_like(z, BETA).scatter_(1, y[:, None], 1.0)
    second_moment = (tempered * reward**2 * ((p**2).sum(-1, keepdim=True) - 2 * p + 1)).sum(-1)
    trace_cov = ((second_moment - (exact * T).pow(2).sum(-1)).sum() / T**2 / num_samples).item()
    assert (per_draw - exact).pow(2).sum((1, 2)).mean().item() == pytest.approx(trace_cov, rel=0.05)
    # unbiased: the mean of all S draws is within a few standard errors of the exact gradient
    assert (per_draw.mean(0) - exact).norm().item() < 3 * math.sqrt(trace_cov / S)

    counts = [32, 128, 512, 2048]
    errors = []
    for n in counts:
        block_means = per_draw.view(S // n, n, T, V).mean(1)
        errors.append((block_means - exact).pow(2).sum((1, 2)).mean().sqrt().item())
        assert 0.75 < errors[-1] / math.sqrt(trace_cov / n) < 1.3, (n, errors[-1], math.sqrt(trace_cov / n))
    # log-log slope of the error against the number of draws: -1/2
    xs, ys = [math.log(n) for n in counts], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (v - my) for x, v in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert abs(slope + 0.5) < 0.1, slope
    # more samples per position, less noise per draw: about 1/sqrt(K) (relative RMS error at 2048 draws)
    assert errors[-1] / exact.norm().item() < (0.25 if num_samples == 1 else 0.08)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_one_sample_only_hits_contribute(backend):
    """With beta = 0 and K = 1 a position learns only when its sample is the label, and then it is an SFT step."""
    hidden, weight, b, labels = make_inputs((4, 10), V=5, seed=15, ignore_frac=0.2)
    mask = labels != IGNORE
    loss, grads, metrics = fused_loss_and_grads(
        hidden, weight, b, labels, backend, gen(3), num_samples=1, temperature=TAU, negative_reward=0.0
    )
    logits = (hidden @ weight.t() + b).detach()
    log_p = torch.log_softmax(logits[mask], -1)
    samples = sample_tokens(log_p, draw_uniforms(int(mask.sum()), 1, gen(3), "cpu"), TAU)[:, 0]
    hits = samples == labels[mask]
    assert hits.any() and not hits.all()
    # exactly the positions that hit get a gradient
    has_grad = grads[0][mask].abs().sum(-1) > 0
    assert torch.equal(has_grad, hits)
    # and the loss is the NLL of the hits, averaged over all supervised positions
    expected = -log_p.gather(1, labels[mask][:, None])[:, 0][hits].sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-13)
    assert metrics["hit_rate"] == pytest.approx(hits.double().mean().item())
    assert metrics["no_hit_fraction"] == pytest.approx(1 - hits.double().mean().item())


def test_metrics_of_sampling_mode():
    hidden, weight, b, labels = make_inputs((3, 9), V=7, seed=16)
    mask = labels != IGNORE
    log_p = torch.log_softmax((hidden @ weight.t() + b).detach()[mask], -1)
    samples = sample_tokens(log_p, draw_uniforms(int(mask.sum()), 4, gen(8), "cpu"), TAU)
    hits = samples == labels[mask][:, None]
    for backend in BACKENDS:
        _, _, metrics = fused_loss_and_grads(hidden, weight, b, labels, backend, gen(8), **settings(4))
        assert metrics["hit_rate"] == pytest.approx(hits.double().mean().item(), abs=1e-12)
        assert metrics["no_hit_fraction"] == pytest.approx((~hits.any(-1)).double().mean().item(), abs=1e-12)
        assert metrics["label_prob"] == pytest.approx(log_p.gather(1, labels[mask][:, None]).exp().mean().item())
        assert "entropy" in metrics and metrics["num_tokens"] == int(mask.sum())


def test_float32_matches_float64_functional():
    hidden, weight, b, labels = make_inputs((4, 16), V=53, D=16, dtype=torch.float32, seed=17)
    got, _ = assert_matches(
        fused_fn(labels, "chunked", gen(4), 5, **settings(8)),
        functional_fn(labels, gen(4), **settings(8)),
        (hidden, weight, b),
        rtol=1e-5,
        atol=1e-6,
        grad_rtol=1e-4,
        grad_atol=1e-6,
    )
    assert got.loss.dtype == torch.float32


def large_vocabulary_inputs():
    """Inputs over a 20000-token vocabulary, chunked by 32 rows: (N, V, chunk, hidden, weight, labels)."""
    N, V, chunk = 512, 20_000, 32
    g = gen(18)
    hidden = torch.randn(N, 16, generator=g).requires_grad_(True)
    weight = (0.1 * torch.randn(V, 16, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    return N, V, chunk, hidden, weight, labels


@pytest.mark.parametrize("num_samples", [256, None], ids=["K256", "exact"])
def test_chunked_never_holds_more_than_a_tile(num_samples):
    N, V, chunk, hidden, weight, labels = large_vocabulary_inputs()
    with LargestTensor() as mode:
        loss = fused_linear_loss(
            hidden, weight, labels, "otr", chunk_size=chunk, num_samples=num_samples, generator=gen(0)
        )
        grads = torch.autograd.grad(loss, [hidden, weight])
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert mode.largest <= max(chunk * V, N * (num_samples or 1)) < N * V


def test_chunked_allocates_its_tiles_once_per_call():
    """The sampler builds its tempered masses in a spare tile the chunked backend keeps for the whole call: a call
    allocates three `[chunk, V]` tiles (log-probs, probabilities, masses) whatever its number of chunks."""
    N, V, chunk, hidden, weight, labels = large_vocabulary_inputs()
    with LargestTensor() as mode:
        loss = fused_linear_loss(hidden, weight, labels, "otr", chunk_size=chunk, num_samples=8, generator=gen(0))
        torch.autograd.grad(loss, [hidden, weight])
    assert sum(numel >= chunk * V for numel in mode.allocated) == 3


# ---------------------------------------------------------------------------------------------------- bad inputs

BAD_SETTINGS = {
    "K-zero": (dict(num_samples=0), "num_samples"),
    "K-negative": (dict(num_samples=-2), "num_samples"),
    "K-float": (dict(num_samples=2.5), "num_samples"),
    "K-bool": (dict(num_samples=True), "num_samples"),
    "K-str": (dict(num_samples="8"), "num_samples"),
    "tau-zero": (dict(temperature=0.0), "temperature"),
    "tau-negative": (dict(temperature=-1.0), "temperature"),
    "tau-nan": (dict(temperature=float("nan")), "temperature"),
    "tau-inf": (dict(temperature=float("inf")), "temperature"),
    "beta-one": (dict(negative_reward=1.0), "negative_reward"),
    "beta-above-one": (dict(negative_reward=1.5), "negative_reward"),
    "beta-nan": (dict(negative_reward=float("nan")), "negative_reward"),
    "generator-int": (dict(generator=0), "generator"),
}


@pytest.mark.parametrize("overrides, field", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_inputs_raise(overrides, field):
    hidden, weight, b, labels = make_inputs((2, 5), seed=19)
    logits = hidden @ weight.t() + b
    with pytest.raises(ValueError, match=f"`{field}"):
        otr_loss(logits, labels, **overrides)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=f"`{field}"):
            fused_linear_loss(hidden, weight, labels, "otr", bias=b, backend=backend, **overrides)
    with pytest.raises(ValueError, match=f"`{field}"):
        OTRMethod(**overrides)


def test_registered_by_name():
    assert METHODS["otr"] is OTRMethod
    hidden, weight, _, labels = make_inputs((2, 5), seed=19)
    with pytest.raises(ValueError, match="'otr' got an unexpected input"):
        fused_linear_loss(hidden, weight, labels, "otr", token_weights=torch.ones(2, 5))


# -------------------------------------------------------------------------------------------------- the trainer

OTR_ARGS = dict(CPU_ARGS, assistant_only_loss=True)
make_trainer = partial(testing_utils.make_trainer, OTRTrainer, OTRConfig, **OTR_ARGS)


def test_trainer_trains_and_logs_otr_metrics(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=4)
    changed = train_and_list_changed_parameters(trainer)
    losses = logged(trainer)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert changed
    hit_rates, no_hit = logged(trainer, "hit_rate"), logged(trainer, "no_hit_fraction")
    assert len(hit_rates) == 4 and all(0 <= x <= 1 for x in hit_rates + no_hit)
    # the head's own metrics are logged too
    assert len(logged(trainer, "mean_label_prob")) == 4 and len(logged(trainer, "entropy")) == 4


def test_trainer_with_lora_trains_only_adapters(tiny_model_dir, tmp_path):
    lora = tiny_lora_config(target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=lora, learning_rate=5e-2)
    changed = train_and_list_changed_parameters(trainer)
    assert changed and all("lora_" in name for name in changed), sorted(changed)
    assert all(math.isfinite(x) for x in logged(trainer))


def test_gradient_accumulation_4x1_equals_1x4(tiny_model_dir, tmp_path):
    """Consecutive draws of the CPU generator concatenate, so four micro-batches of one sequence sample what one
    batch of four samples: the runs agree step by step (and another seed does not)."""
    otr = dict(num_samples=2, negative_reward=-0.5)  # a strong dependence on the samples drawn
    runs = []
    for batch, accumulation, seed in ((4, 1, None), (1, 4, None), (1, 4, 1)):
        trainer = make_trainer(
            tiny_model_dir,
            tmp_path / f"{batch}x{accumulation}-{seed}",
            otr_seed=seed,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **otr,
        )
        trainer.train()
        runs.append(trainer)
    assert logged(runs[1]) == pytest.approx(logged(runs[0]), abs=1e-5)
    assert_same_parameters(runs[0], runs[1])
    assert logged(runs[2]) != pytest.approx(logged(runs[0]), abs=1e-5)


@pytest.mark.parametrize("lora_dropout", [None, CLI_LORA_DROPOUT], ids=["full", "lora-dropout"])
def test_resume_from_checkpoint_continues_the_sample_stream(tiny_model_dir, tmp_path, lora_dropout):
    # the losses must depend on the samples for the comparison to mean anything: with few samples (K = 2) and a large
    # negative reward, another sample stream gives clearly different losses (checked at the end)
    otr = dict(max_steps=4, num_samples=2, negative_reward=-0.5, learning_rate=2e-2)

    def make(output_dir, **overrides):
        peft_config = None if lora_dropout is None else tiny_lora_config(lora_dropout)
        return make_trainer(tiny_model_dir, output_dir, peft_config=peft_config, **otr, **overrides)

    full, resumed, checkpoint = uninterrupted_and_resumed(make, tmp_path)
    assert os.path.isfile(os.path.join(checkpoint, "otr_rng_state.pth"))
    # the resumed trainer's history starts with the checkpoint's two steps; steps 3 and 4 are its own
    assert len(logged(resumed)) == 4
    assert logged(resumed)[2:] == pytest.approx(logged(full)[2:], abs=1e-6)
    assert logged(resumed, "hit_rate")[2:] == pytest.approx(logged(full, "hit_rate")[2:], abs=1e-9)

    # without the saved sampling state the resumed run draws other samples and its losses differ
    stateless = tmp_path / "stateless" / "checkpoint-2"
    shutil.copytree(checkpoint, stateless)
    (stateless / "otr_rng_state.pth").unlink()
    other = make(tmp_path / "stateless", save_strategy="steps", save_steps=2)
    other.train(resume_from_checkpoint=str(stateless))
    assert logged(other)[2:] != pytest.approx(logged(full)[2:], abs=1e-6)


def test_gradient_checkpointing_and_evaluation_do_not_change_the_stream(tiny_model_dir, tmp_path):
    """The head is outside the checkpointed layers (no resampling), and evaluation uses the exact expectation (no
    draws): neither changes the training losses."""
    busy = checkpointed_with_evaluation(partial(make_trainer, tiny_model_dir), tmp_path)
    assert len(logged(busy, "eval_loss")) == 3


def test_exact_expectation_trainer(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, num_samples=None)
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer))
    assert logged(trainer, "hit_rate") and not logged(trainer, "no_hit_fraction")


def test_config_from_the_command_line(tmp_path):
    parser = HfArgumentParser(OTRConfig)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    (config,) = parser.parse_args_into_dataclasses(base)
    assert (config.num_samples, config.temperature, config.negative_reward, config.otr_seed) == (8, 1.2, -0.1, None)
    (config,) = parser.parse_args_into_dataclasses(
        [*base, "--num_samples", "256", "--temperature", "1.5", "--negative_reward", "-0.05", "--otr_seed", "3"]
    )
    assert (config.num_samples, config.temperature, config.negative_reward, config.otr_seed) == (256, 1.5, -0.05, 3)
    for spelling in ("none", "exact", "None"):
        (config,) = parser.parse_args_into_dataclasses([*base, "--num_samples", spelling])
        assert config.num_samples is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples="many"), "num_samples"),
        (dict(temperature=0.0), "temperature"),
        (dict(negative_reward=1.0), "negative_reward"),
        (dict(otr_seed=1.5), "otr_seed"),
        (dict(loss_type="dft"), "loss_type"),
    ],
)
def test_bad_config_values_raise(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        OTRConfig(output_dir=str(tmp_path), **{**OTR_ARGS, **overrides})


def test_plain_sft_config_gets_otr_defaults(tiny_model_dir, tmp_path):
    from trl import SFTConfig

    trainer = testing_utils.make_trainer(
        OTRTrainer,
        SFTConfig,
        tiny_model_dir,
        tmp_path,
        tiny_conversational_dataset(8),
        max_steps=1,
        learning_rate=1e-3,
        assistant_only_loss=True,
    )
    assert isinstance(trainer.args, OTRConfig)
    assert (trainer.args.num_samples, trainer.args.temperature, trainer.args.negative_reward) == (8, 1.2, -0.1)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.assistant_only_loss
    trainer.train()
    assert logged(trainer, "hit_rate")
