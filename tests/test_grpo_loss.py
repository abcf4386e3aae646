"""GRPO's loss: `grpo_loss` against TRL 1.16's own `GRPOTrainer._compute_loss`, and the fused `"grpo"` method against
`grpo_loss`.

`grpo_loss` must equal TRL's `_compute_loss` (run unbound, on the per-token log-probs and entropies of the same
float64 logits) in value, in its gradient w.r.t. the logits and in every metric TRL logs, for every loss type, both
importance-sampling levels, on- and off-policy, beta with and without the bias-corrected KL, delta, epsilon_high, the
vLLM importance-sampling ratio, the off-policy mask, the entropy bonus, the temperature, gradient accumulation,
several processes and evaluation. The fused head must equal `grpo_loss` on `hidden @ weight.T + bias` in value and in
the gradients w.r.t. hidden, weight and bias on every backend (float64), report the same statistics, never hold the
`[N, V]` logits on the chunked path, and make three matmuls per tile where no first pass is needed.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from testing_utils import BACKENDS, F64, IGNORE, LargestTensor, as_leaves, gen, leaves, logits_of, random_linear
from trl import GRPOTrainer

import hf_plugins
from hf_plugins.losses import METHODS, GRPOMethod, grpo_loss
from hf_plugins.losses import grpo as grpo_module
from hf_plugins.losses.grpo import LOSS_TYPES, STATISTICS_METRIC, GRPOOptions
from hf_plugins.ops import fused_linear_loss


TOLERANCE = dict(rtol=1e-9, atol=1e-12)
KL_SETTINGS = {
    "beta0": {"beta": 0.0},
    "kl-bias": {"beta": 0.04, "use_bias_correction_kl": True},
    "kl-plain": {"beta": 0.04, "use_bias_correction_kl": False},
}


# ---------------------------------------------------------------------------------------------------------- inputs


def make_batch(B=4, T=6, V=37, D=8, *, seed=0, temperature=1.0, spread=0.6, bias=True):
    """hidden [B, T, D], weight, bias (leaves), completion labels with right padding and one empty completion, and
    per-token inputs: advantages [B] (both signs), old log-probs = the current ones plus noise of `spread` (ratios
    on both sides of the clip range), reference and sampler log-probs near them."""
    g = gen(seed)
    hidden, weight, b = as_leaves(*random_linear(g, (B, T), V, D, bias=bias, scale=1.5))
    labels = torch.randint(0, V, (B, T), generator=g)
    for row in range(B):  # right padding of different lengths
        labels[row, T - (row % 3) :] = IGNORE
    if B > 2:
        labels[B - 1] = IGNORE  # a completion with no loss token (e.g. masked as truncated)
    with torch.no_grad():
        logits = logits_of(hidden, weight, b)
        lp = torch.log_softmax(logits / temperature, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    noise = lambda scale: scale * torch.randn(B, T, generator=g, dtype=F64)  # noqa: E731
    advantages = torch.randn(B, generator=g, dtype=F64)
    advantages[0] = abs(advantages[0]) + 0.5
    if B > 1:
        advantages[1] = -abs(advantages[1]) - 0.5
    return {
        "hidden": hidden,
        "weight": weight,
        "bias": b,
        "labels": labels,
        "advantages": advantages,
        "old": lp + noise(spread),
        "ref": lp + noise(0.5),
        "sampling": lp + noise(0.3),
    }


def batch_logits(batch):
    return logits_of(batch["hidden"], batch["weight"], batch["bias"])


def tensor_inputs(batch, off_policy, extra):
    """The per-token inputs of a call, named as `grpo_loss` takes them."""
    inputs = {"advantages": batch["advantages"], "ref_log_probs": batch["ref"]}
    if off_policy:
        inputs["old_log_probs"] = batch["old"]
    for name in ("importance_sampling_ratio", "sampling_log_probs", "num_items_in_batch"):
        if name in extra:
            inputs[name] = extra[name]
    return inputs


# ------------------------------------------------------------------------------- TRL's own _compute_loss, unbound


class SingleProcessAccelerator:
    """What `_compute_loss` uses of the trainer's accelerator, for one process: gathering and sum-reducing are the
    identity, as accelerate's are on a single process (`num_processes` only sets the dapo normaliser)."""

    def __init__(self, num_processes=1):
        self.num_processes = num_processes
        self.sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor


def trl_compute_loss(
    logits,
    labels,
    advantages,
    old_log_probs=None,
    ref_log_probs=None,
    importance_sampling_ratio=None,
    sampling_log_probs=None,
    num_items_in_batch=None,
    **options,
):
    """TRL 1.16's `GRPOTrainer._compute_loss`, called unbound on the trainer attributes it reads (set here as
    `GRPOTrainer.__init__` sets them from the config), with the per-token log-probs and entropies of `logits` at the
    temperature in place of its model forward (which computes exactly those, zero outside the completion mask).
    Returns `(loss, logged metrics)`."""
    o = GRPOOptions(**options)
    mask = labels != IGNORE
    log_probs = torch.log_softmax(logits / o.temperature, dim=-1)
    lp = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    entropies = -(log_probs.exp() * log_probs).sum(-1).masked_fill(~mask, 0.0)
    B, T = labels.shape
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=o.off_policy_mask_threshold,
        importance_sampling_level=o.importance_sampling_level,
        beta=o.beta,
        loss_type=o.loss_type,
        epsilon_low=o.epsilon,
        epsilon_high=o.epsilon_high if o.epsilon_high is not None else o.epsilon,
        args=SimpleNamespace(
            use_bias_correction_kl=o.use_bias_correction_kl,
            delta=o.delta,
            sapo_temperature_pos=o.sapo_temperature_pos,
            sapo_temperature_neg=o.sapo_temperature_neg,
            vespo_k_pos=o.vespo_k_pos,
            vespo_lambda_pos=o.vespo_lambda_pos,
            vespo_k_neg=o.vespo_k_neg,
            vespo_lambda_neg=o.vespo_lambda_neg,
            steps_per_generation=o.steps_per_generation,
            entropy_target=0.2,
        ),
        use_vllm=importance_sampling_ratio is not None,
        vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=o.training),
        current_gradient_accumulation_steps=o.gradient_accumulation_steps,
        max_completion_length=o.max_completion_length,
        accelerator=SingleProcessAccelerator(o.num_processes),
        _entropy_bonus_enabled=o.entropy_coef != 0.0,
        use_adaptive_entropy=False,
        entropy_coef=o.entropy_coef,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (lp, entropies, None),
    )
    completion_mask = mask.long()
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.long),
        "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
        "completion_ids": labels.clamp(min=0),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum()
        if num_items_in_batch is None
        else torch.as_tensor(num_items_in_batch),
    }
    optional = {
        "old_per_token_logps": old_log_probs,
        "ref_per_token_logps": ref_log_probs if o.beta != 0.0 else None,
        "importance_sampling_ratio": importance_sampling_ratio,
        "sampling_per_token_logps": sampling_log_probs,
    }
    inputs.update({name: value for name, value in optional.items() if value is not None})
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    mode = "train" if o.training else "eval"
    return loss, {name: values[-1] for name, values in trainer._metrics[mode].items()}


# ------------------------------------------------------------------------------------------------------- helpers


def options_for(loss_type, level, kl, **extra):
    options = {"loss_type": loss_type, "importance_sampling_level": level, **KL_SETTINGS[kl]}
    if loss_type == "dr_grpo":
        options["max_completion_length"] = 8
    return {**options, **extra}


def split(extra):
    """`extra` as (tensor inputs, scalar options)."""
    tensors = ("importance_sampling_ratio", "sampling_log_probs", "num_items_in_batch")
    return {k: v for k, v in extra.items() if k in tensors}, {k: v for k, v in extra.items() if k not in tensors}


def assert_metrics_equal(got: dict, expected: dict):
    expected = {k: v for k, v in expected.items() if k not in ("policy_loss", "entropy_coef")}
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for name, value in expected.items():
        torch.testing.assert_close(
            torch.tensor(got[name]), torch.tensor(value), rtol=1e-9, atol=1e-12, equal_nan=True, msg=name
        )


def check_against_trl(batch, off_policy, tensors, options):
    logits = batch_logits(batch).detach().requires_grad_(True)
    inputs = tensor_inputs(batch, off_policy, tensors)
    loss, stats = grpo_loss(logits, batch["labels"], **inputs, return_statistics=True, **options)
    (grad,) = torch.autograd.grad(loss, [logits])
    logits_trl = logits.detach().requires_grad_(True)
    expected_loss, expected_metrics = trl_compute_loss(logits_trl, batch["labels"], **inputs, **options)
    (expected_grad,) = torch.autograd.grad(expected_loss, [logits_trl])
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    torch.testing.assert_close(grad, expected_grad, **TOLERANCE)
    assert_metrics_equal(stats.metrics(), expected_metrics)
    if options.get("entropy_coef", 0.0) != 0.0:
        torch.testing.assert_close(stats.policy_loss, torch.tensor(expected_metrics["policy_loss"], dtype=F64))
    return loss, grad


# -------------------------------------------------------------------------------------------- grpo_loss == TRL


def test_grpo_is_registered_and_exported():
    assert METHODS["grpo"] is GRPOMethod
    assert hf_plugins.grpo_loss is grpo_loss


@pytest.mark.parametrize("kl", KL_SETTINGS)
@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_equals_trl(loss_type, level, off_policy, kl):
    """Every loss type x level x on/off-policy x KL setting, with temperature, epsilon_high and the entropy bonus."""
    batch = make_batch(seed=1, temperature=0.7)
    options = options_for(
        loss_type, level, kl, temperature=0.7, epsilon_high=5.0 if loss_type == "cispo" else 0.28, entropy_coef=0.05
    )
    check_against_trl(batch, off_policy, {}, options)


FEATURES = {
    "defaults": lambda b: {},
    "delta": lambda b: {"delta": 1.3, "epsilon": 0.1},
    "cispo-default-cap": lambda b: {"epsilon_high": None},
    "off-policy-mask-old": lambda b: {"off_policy_mask_threshold": 0.05},
    "off-policy-mask-sampler": lambda b: {"off_policy_mask_threshold": 0.05, "sampling_log_probs": b["sampling"]},
    "vllm-is-token": lambda b: {"importance_sampling_ratio": torch.exp(b["old"] - b["sampling"]).clamp(max=3.0)},
    "vllm-is-sequence": lambda b: {"importance_sampling_ratio": torch.rand(b["labels"].shape[0], 1, dtype=F64) + 0.5},
    "accumulation": lambda b: {
        "gradient_accumulation_steps": 3,
        "num_processes": 2,
        "steps_per_generation": 6,
        "num_items_in_batch": 41,
    },
    "eval": lambda b: {"training": False, "gradient_accumulation_steps": 3, "steps_per_generation": 6},
    "sapo-temperatures": lambda b: {"sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.9},
    "vespo-params": lambda b: {
        "vespo_k_pos": 1.5,
        "vespo_lambda_pos": 0.7,
        "vespo_k_neg": 2.5,
        "vespo_lambda_neg": 1.1,
    },
    "entropy-only": lambda b: {"entropy_coef": -0.2},
}


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_equals_trl_per_feature(loss_type, feature, level, off_policy):
    batch = make_batch(seed=2, spread=1.0)
    tensors, extra = split(FEATURES[feature](batch))
    options = options_for(loss_type, level, "kl-bias", **extra)
    check_against_trl(batch, off_policy, tensors, options)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_equals_trl_with_per_token_advantages(loss_type, level):
    batch = make_batch(seed=3)
    g = gen(3)
    batch["advantages"] = torch.randn(batch["labels"].shape, generator=g, dtype=F64)
    check_against_trl(batch, True, {}, options_for(loss_type, level, "kl-bias", entropy_coef=0.1))


def test_the_test_inputs_leave_the_clip_range_on_both_sides():
    """The off-policy batches above put ratios below 1 - eps and above 1 + eps_high for both advantage signs."""
    batch = make_batch(seed=1, temperature=0.7)
    mask = batch["labels"] != IGNORE
    _, stats = grpo_loss(
        batch_logits(batch).detach(),
        batch["labels"],
        **tensor_inputs(batch, True, {}),
        temperature=0.7,
        epsilon_high=0.28,
        return_statistics=True,
    )
    metrics = stats.metrics()
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert 0 < metrics["clip_ratio/region_mean"] < 1 and mask.sum() > 10


def test_on_policy_ratios_are_one_and_dapo_is_the_advantage_weighted_nll():
    """On-policy dapo with beta=0 is `-sum_t A_i lp_t / N`, in value and gradient (a closed form, not TRL)."""
    batch = make_batch(seed=4)
    logits = batch_logits(batch).detach().requires_grad_(True)
    labels, mask = batch["labels"], batch["labels"] != IGNORE
    loss = grpo_loss(logits, labels, batch["advantages"])
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    surrogate = -(batch["advantages"][:, None] * lp * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, -(batch["advantages"][:, None] * mask).sum() / mask.sum())  # value: -mean A
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(surrogate, logits)[0])


# ------------------------------------------------------------------------------------ fused "grpo" == grpo_loss


def functional(batch, off_policy, tensors, options):
    h, w, b = (
        None if t is None else t.detach().clone().requires_grad_(True)
        for t in (batch["hidden"], batch["weight"], batch["bias"])
    )
    loss, stats = grpo_loss(
        logits_of(h, w, b),
        batch["labels"],
        **tensor_inputs(batch, off_policy, tensors),
        return_statistics=True,
        **options,
    )
    return loss.detach(), torch.autograd.grad(loss, leaves(h, w, b)), stats


def fused(batch, off_policy, tensors, options, backend, chunk_size=5, method=None):
    method = GRPOMethod() if method is None else method
    loss, metrics = fused_linear_loss(
        batch["hidden"],
        batch["weight"],
        batch["labels"],
        method,
        bias=batch["bias"],
        backend=backend,
        chunk_size=chunk_size,
        return_metrics=True,
        **tensor_inputs(batch, off_policy, tensors),
        **options,
    )
    grads = torch.autograd.grad(loss, leaves(batch["hidden"], batch["weight"], batch["bias"]))
    return loss.detach(), grads, metrics[STATISTICS_METRIC]


def assert_fused_equals_functional(batch, off_policy, tensors, options, backend, chunk_size=5):
    loss, grads, stats = fused(batch, off_policy, tensors, options, backend, chunk_size)
    expected_loss, expected_grads, expected_stats = functional(batch, off_policy, tensors, options)
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, **TOLERANCE)
    assert_metrics_equal(stats.metrics(), expected_stats.metrics())
    torch.testing.assert_close(stats.policy_loss, expected_stats.policy_loss, **TOLERANCE)
    torch.testing.assert_close(stats.entropy_window, expected_stats.entropy_window, **TOLERANCE)


@pytest.mark.parametrize("kl", KL_SETTINGS)
@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_fused_equals_grpo_loss(backend, loss_type, level, off_policy, kl):
    batch = make_batch(seed=5, temperature=0.7)
    options = options_for(
        loss_type, level, kl, temperature=0.7, epsilon_high=5.0 if loss_type == "cispo" else 0.28, entropy_coef=0.05
    )
    assert_fused_equals_functional(batch, off_policy, {}, options, backend)


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_triton_equals_grpo_loss(loss_type, level, off_policy):
    """The kernel's two-launch mode under the interpreter: V = 37 spans three vocabulary blocks of 16."""
    batch = make_batch(B=3, T=4, V=37, D=4, seed=6, temperature=0.7)
    options = options_for(
        loss_type,
        level,
        "kl-bias",
        temperature=0.7,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28,
        entropy_coef=0.05,
    )
    assert_fused_equals_functional(batch, off_policy, {}, options, "triton", chunk_size=4)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_fused_equals_grpo_loss_per_feature(backend, feature):
    """Each feature once per loss type family: clipped (dapo, GSPO), cispo, sapo, vespo, luspo."""
    for loss_type, level in (
        ("dapo", "token"),
        ("grpo", "sequence"),
        ("cispo", "token"),
        ("sapo", "sequence"),
        ("vespo", "token"),
        ("luspo", "sequence"),
    ):
        batch = make_batch(seed=7, spread=1.0)
        tensors, extra = split(FEATURES[feature](batch))
        options = options_for(loss_type, level, "kl-bias", **extra)
        assert_fused_equals_functional(batch, True, tensors, options, backend)


@pytest.mark.parametrize("feature", ["off-policy-mask-sampler", "vllm-is-token", "accumulation", "defaults"])
def test_fused_triton_equals_grpo_loss_per_feature(feature):
    for loss_type, level in (("dapo", "sequence"), ("vespo", "token")):
        batch = make_batch(B=3, T=4, D=4, seed=8, spread=1.0)
        tensors, extra = split(FEATURES[feature](batch))
        options = options_for(loss_type, level, "kl-bias", **extra)
        assert_fused_equals_functional(batch, True, tensors, options, "triton", chunk_size=4)


def _edge_batch(case):
    if case == "one-token":
        batch = make_batch(B=1, T=1, seed=9)
        batch["labels"][0, 0] = 3
        return batch
    batch = make_batch(B=3, T=5, V=37, D=4, seed=10)
    if case == "zero-advantages":
        batch["advantages"] = torch.zeros_like(batch["advantages"])
    elif case == "no-loss-token":
        batch["labels"][:] = IGNORE
    elif case == "no-bias":
        batch["bias"] = None
    return batch


EDGE_OPTIONS = {
    "dapo": {"loss_type": "dapo", "beta": 0.04, "entropy_coef": 0.1},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04, "delta": 1.5},
    "vespo": {"loss_type": "vespo", "beta": 0.04, "off_policy_mask_threshold": 0.1},
}


@pytest.mark.parametrize("options", EDGE_OPTIONS.values(), ids=EDGE_OPTIONS.keys())
@pytest.mark.parametrize("case", ["one-token", "zero-advantages", "no-loss-token", "no-bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_edge_cases(backend, case, options):
    batch = _edge_batch(case)
    for off_policy in (False, True):
        assert_fused_equals_functional(batch, off_policy, {}, options, backend, chunk_size=4)
    loss, grads, _ = fused(batch, True, {}, options, backend)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if case == "no-loss-token":
        assert loss == 0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_rows_are_one_completion(backend):
    batch = make_batch(B=1, T=7, V=37, D=4, seed=11)
    flat = {
        **batch,
        "hidden": batch["hidden"][0].detach().requires_grad_(True),
        "labels": batch["labels"][0],
        "old": batch["old"][0],
        "ref": batch["ref"][0],
        "advantages": batch["advantages"],
    }
    options = options_for("grpo", "sequence", "kl-bias", entropy_coef=0.1)
    expected_loss, expected_grads, _ = functional(batch, True, {}, options)
    loss, grads, _ = fused(flat, True, {}, options, backend)
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    torch.testing.assert_close(grads[0], expected_grads[0][0], **TOLERANCE)
    for grad, expected in zip(grads[1:], expected_grads[1:]):
        torch.testing.assert_close(grad, expected, **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_value_and_statistics(backend):
    """Evaluation runs the head without gradients: the same value and statistics."""
    batch = make_batch(B=3, T=4, V=37, D=4, seed=12)
    options = options_for("dapo", "sequence", "kl-bias", entropy_coef=0.1, training=False)
    expected_loss, _, expected_stats = functional(batch, True, {}, options)
    with torch.no_grad():
        loss, metrics = fused_linear_loss(
            batch["hidden"],
            batch["weight"],
            batch["labels"],
            GRPOMethod(),
            bias=batch["bias"],
            backend=backend,
            chunk_size=4,
            return_metrics=True,
            **tensor_inputs(batch, True, {}),
            **options,
        )
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    assert_metrics_equal(metrics[STATISTICS_METRIC].metrics(), expected_stats.metrics())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_method_object_keeps_no_state_between_calls(backend):
    """The statistics come back with each call's metrics: a second call on the same `GRPOMethod` (other inputs,
    other options) changes neither the first call's statistics nor its own results."""
    method = GRPOMethod()
    first, second = make_batch(B=3, T=4, V=37, D=4, seed=19), make_batch(B=2, T=5, V=37, D=4, seed=20)
    options_1 = options_for("dapo", "sequence", "kl-bias", entropy_coef=0.1)
    options_2 = options_for("cispo", "token", "beta0", temperature=0.7)
    loss_1, grads_1, stats_1 = fused(first, True, {}, options_1, backend, chunk_size=3, method=method)
    loss_2, grads_2, stats_2 = fused(second, False, {}, options_2, backend, chunk_size=3, method=method)
    for (loss, grads, stats), (batch, off_policy, options) in zip(
        ((loss_1, grads_1, stats_1), (loss_2, grads_2, stats_2)),
        ((first, True, options_1), (second, False, options_2)),
    ):
        expected_loss, expected_grads, expected_stats = functional(batch, off_policy, {}, options)
        torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, **TOLERANCE)
        assert_metrics_equal(stats.metrics(), expected_stats.metrics())


def test_float32_inputs_match_float64():
    batch = make_batch(seed=13)
    options = options_for("dapo", "token", "kl-bias", entropy_coef=0.1)
    expected_loss, expected_grads, _ = functional(batch, True, {}, options)
    batch32 = {
        k: (
            v.detach().float().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
        )
        for k, v in batch.items()
    }
    loss, grads, _ = fused(batch32, True, {}, options, "chunked")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- memory and matmuls


def _tracked(options, off_policy, N_rows=256, V=20_000, D=8, chunk=64, B=4):
    g = gen(14)
    T = N_rows // B
    hidden = torch.randn(B, T, D, generator=g).requires_grad_(True)
    weight = (0.1 * torch.randn(V, D, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    lp = torch.full((B, T), -10.0)
    inputs = {"advantages": torch.randn(B, generator=g), "ref_log_probs": lp + 0.1}
    if off_policy:
        inputs["old_log_probs"] = lp - 0.1
    with LargestTensor() as tracker:
        loss = fused_linear_loss(
            hidden, weight, labels, "grpo", backend="chunked", chunk_size=chunk, **inputs, **options
        )
        grads = torch.autograd.grad(loss, [hidden, weight])
    assert all(torch.isfinite(grad).all() for grad in grads)
    logit_tiles = [shape for shape in tracker.matmul_outputs if shape[-1] == V]
    return tracker, logit_tiles, N_rows * V, T * V


def test_chunked_token_level_holds_no_logits_and_makes_three_matmuls_per_tile():
    options = {"loss_type": "dapo", "beta": 0.04, "entropy_coef": 0.01, "temperature": 0.7}
    tracker, logit_tiles, full, _ = _tracked(options, off_policy=True)
    assert tracker.largest < full // 2
    assert logit_tiles == [(64, 20_000)] * 4  # one logits tile per 64 rows, no first pass
    assert len(tracker.matmul_outputs) == 3 * 4  # logits, grad hidden, grad weight


def test_chunked_sequence_level_tiles_whole_completions_without_a_first_pass():
    options = {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04}
    tracker, logit_tiles, full, one_completion = _tracked(options, off_policy=True)
    assert tracker.largest < full // 2
    assert logit_tiles == [(64, 20_000)] * 4  # each 64-row tile holds one whole completion
    assert len(tracker.matmul_outputs) == 3 * 4


def test_chunked_sequence_level_takes_a_first_pass_for_completions_too_long_for_a_tile(monkeypatch):
    monkeypatch.setattr(grpo_module, "SEQUENCE_TILE_BUDGET", 32 * 20_000)  # completions of 64 rows: over budget
    options = {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04}
    tracker, logit_tiles, full, _ = _tracked(options, off_policy=True)
    assert tracker.largest < full // 2
    assert len(logit_tiles) == 2 * 4  # the no-grad pass, then the pass with gradients
    assert len(tracker.matmul_outputs) == 4 * 4


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_makes_three_matmuls_per_tile(level):
    """Off-policy, with the bias-corrected KL: at the sequence level each tile holds whole completions."""
    batch = make_batch(B=3, T=4, V=37, D=4, seed=15)  # completions of 4 and 3 rows (and an empty one)
    with LargestTensor() as tracker:
        fused(batch, True, {}, options_for("grpo", level, "kl-bias", entropy_coef=0.1), "triton", chunk_size=3)
    tiles = [s for s in tracker.matmul_outputs if s[-1] == 37]
    assert tiles == ([(4, 37), (3, 37)] if level == "sequence" else [(3, 37), (3, 37), (1, 37)])
    assert len(tracker.matmul_outputs) == 3 * len(tiles)  # logits, grad hidden, grad weight; no first pass


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_completions_over_the_tile_budget_take_a_first_pass(backend, monkeypatch):
    """Sequence-level terms of completions too long for a tile come from a no-grad pass: one more matmul per tile,
    the same loss and gradients."""
    monkeypatch.setattr(grpo_module, "SEQUENCE_TILE_BUDGET", 2 * 37)  # two rows of V = 37
    batch = make_batch(B=3, T=4, V=37, D=4, seed=18)
    for loss_type in ("grpo", "vespo"):
        options = options_for(loss_type, "sequence", "kl-bias", entropy_coef=0.1, off_policy_mask_threshold=0.1)
        assert_fused_equals_functional(batch, True, {}, options, backend, chunk_size=3)
        with LargestTensor() as tracker:
            fused(batch, True, {}, options, backend, chunk_size=3)
        tiles = [s for s in tracker.matmul_outputs if s[-1] == 37]
        assert tiles[:3] == [(3, 37), (3, 37), (1, 37)]  # the first pass, in plain tiles
        assert len(tiles) == 2 * 3


# ----------------------------------------------------------------------------------------------------- refusals


BAD = {
    "loss-type": ({"loss_type": "ppo"}, "loss_type"),
    "level": ({"importance_sampling_level": "batch"}, "importance_sampling_level"),
    "dr-grpo-length": ({"loss_type": "dr_grpo"}, "max_completion_length"),
    "beta-without-ref": ({"beta": 0.1, "ref_log_probs": None}, "ref_log_probs"),
    "temperature": ({"temperature": 0.0}, "temperature"),
    "epsilon": ({"epsilon": float("nan")}, "epsilon"),
    "accumulation": ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    "advantages-shape": ({"advantages": torch.zeros(5)}, "advantages"),
    "old-shape": ({"old_log_probs": torch.zeros(4, 5, dtype=F64)}, "old_log_probs"),
    "unknown-option": ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs_raise_one_clear_error(case):
    overrides, match = case
    batch = make_batch(seed=16)
    inputs = {**tensor_inputs(batch, True, {}), "beta": 0.04}
    inputs.update(overrides)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        grpo_loss(batch_logits(batch).detach(), batch["labels"], **inputs)
    with pytest.raises(ValueError, match=match):
        fused_linear_loss(
            batch["hidden"], batch["weight"], batch["labels"], "grpo", bias=batch["bias"], backend="chunked", **inputs
        )


def test_liger_backend_is_refused_for_grpo(monkeypatch):
    from hf_plugins.ops import dispatch, liger

    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    monkeypatch.setattr(liger, "liger_available", lambda: True)
    batch = make_batch(seed=17)
    with pytest.raises(ValueError, match="'liger' covers the methods .* not 'grpo'"):
        dispatch.fused_linear_loss(
            batch["hidden"], batch["weight"], batch["labels"], "grpo", backend="liger", advantages=batch["advantages"]
        )
