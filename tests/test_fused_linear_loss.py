"""`fused_linear_loss` against the functional losses on materialised logits.

Every backend must equal `sft_loss` / `dft_loss` / `weighted_sft_loss` applied to `hidden @ weight.T + bias`, in value
and in the gradients w.r.t. hidden, weight and bias, and the chunked backend must never hold the full logits.
"""

import pytest
import testing_utils
import torch
from testing_utils import (
    BACKENDS,
    F64,
    IGNORE,
    LargestTensor,
    assert_matches,
    float64_copies,
    gen,
    leaves,
    logits_of,
    loss_and_grads,
)

from hf_plugins.losses import SFTMethod, dft_loss, sft_loss, weighted_sft_loss
from hf_plugins.ops import fused_linear_loss


METHODS = ("sft", "dft", "weighted")


# ---------------------------------------------------------------------------------------------------------- helpers


def make_inputs(shape, V=37, D=8, *, dtype=F64, bias=True, seed=0, ignore_frac=0.25):
    """Random hidden [*shape, D], weight [V, D], bias [V], labels [*shape] (some -100) and token weights."""
    g = gen(seed)
    hidden, weight, b, labels = testing_utils.make_inputs(
        shape, V, D, dtype=dtype, bias=bias, ignore_frac=ignore_frac, generator=g
    )
    token_weights = 2 * torch.rand(shape, generator=g, dtype=F64)
    token_weights[torch.rand(shape, generator=g) < 0.2] = 0.0
    return hidden, weight, b, labels, token_weights


def method_inputs(method, token_weights):
    return {"token_weights": token_weights} if method == "weighted" else {}


def functional(method, logits, labels, num_items_in_batch, token_weights):
    if method == "sft":
        return sft_loss(logits, labels, num_items_in_batch=num_items_in_batch)
    if method == "dft":
        return dft_loss(logits, labels, num_items_in_batch=num_items_in_batch)
    return weighted_sft_loss(logits, labels, token_weights, num_items_in_batch=num_items_in_batch)


def fused_fn(method, backend, labels, token_weights, **kwargs):
    """The fused head as a function of (hidden, weight, bias)."""
    return lambda h, w, b: fused_linear_loss(
        h, w, labels, method, bias=b, backend=backend, **kwargs, **method_inputs(method, token_weights)
    )


def functional_fn(method, labels, token_weights, num_items=None):
    """The functional loss on the materialised logits, as a function of (hidden, weight, bias)."""
    return lambda h, w, b: functional(method, logits_of(h, w, b), labels, num_items, token_weights)


def assert_fused_matches(method, backend, hidden, weight, bias, labels, token_weights, *, tol, upstream=1.0, **kwargs):
    """The fused head equals the functional loss on float64 materialised logits; returns its loss and gradients."""
    got, _ = assert_matches(
        fused_fn(method, backend, labels, token_weights, **kwargs),
        functional_fn(method, labels, token_weights, kwargs.get("num_items_in_batch")),
        (hidden, weight, bias),
        rtol=tol,
        atol=tol,
        upstream=upstream,
    )
    return got.loss, got.grads


# ----------------------------------------------------------------------------------------- value and gradients


@pytest.mark.parametrize("shape", [(3, 7), (21,)], ids=["BTD", "ND"])
@pytest.mark.parametrize("num_items", [None, 40, "tensor"], ids=["mean", "int", "tensor"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_functional_float64(method, backend, bias, num_items, shape):
    seed = METHODS.index(method) + 10 * len(shape)
    hidden, weight, b, labels, token_weights = make_inputs(shape, bias=bias, seed=seed)
    n = torch.tensor(40) if num_items == "tensor" else num_items
    assert_fused_matches(
        method, backend, hidden, weight, b, labels, token_weights, tol=1e-9, chunk_size=4, num_items_in_batch=n
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_default_chunk_size_and_auto_backend(method, backend):
    hidden, weight, b, labels, token_weights = make_inputs((2, 9), seed=5)
    assert_fused_matches(method, backend, hidden, weight, b, labels, token_weights, tol=1e-9)
    auto = loss_and_grads(fused_fn(method, "auto", labels, token_weights), (hidden, weight, b)).loss
    chosen = loss_and_grads(fused_fn(method, backend, labels, token_weights), (hidden, weight, b)).loss
    torch.testing.assert_close(auto, chosen, rtol=1e-12, atol=1e-12)


def test_method_object_equals_method_name():
    hidden, weight, b, labels, _ = make_inputs((2, 9), seed=6)
    by_name = fused_linear_loss(hidden, weight, labels, "sft", bias=b, backend="chunked", chunk_size=3)
    by_object = fused_linear_loss(hidden, weight, labels, SFTMethod(), bias=b, backend="chunked", chunk_size=3)
    torch.testing.assert_close(by_name, by_object, rtol=0, atol=0)


def _stateful_method_calls(name, shape, seed):
    """Two calls' inputs for `name` with different per-call settings (a method's call-level inputs)."""
    from hf_plugins.losses import METHODS as REGISTERED

    hidden, weight, b, labels, token_weights = make_inputs(shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)

    def reference(kl_coef):
        ref_hidden = torch.randn(*shape, 5, generator=g, dtype=F64)
        return {"ref_hidden": ref_hidden, "ref_weight": torch.randn(37, 5, generator=g, dtype=F64), "kl_coef": kl_coef}

    inputs = {
        "weighted": [{"token_weights": token_weights}] * 2,
        "asft": [reference(0.3), reference(0.0)],
        "otr": [
            {"num_samples": 4, "temperature": 0.7, "generator": torch.Generator().manual_seed(1)},
            {"num_samples": None, "temperature": 1.3},
        ],
        "poft": [
            {"ref_scores": -3 * torch.rand(shape[0], generator=g, dtype=F64), "beta": beta, "gamma": gamma}
            for beta, gamma in ((2.0, 0.5), (0.5, -0.2))
        ],
    }.get(name, [{}, {}])
    return REGISTERED[name], (hidden, weight, b, labels), inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sft", "dft", "weighted", "asft", "otr", "poft"])
def test_a_method_object_keeps_no_state_between_calls(name, backend):
    """A method's attributes are its configuration: a call writes none of them, and a second call on the same object
    (other inputs, other per-call settings) gives exactly what a fresh object gives."""
    method_class, (hidden, weight, b, labels), calls = _stateful_method_calls(name, (3, 7), seed=21)
    method = method_class()
    attributes = dict(vars(method))
    results = []
    for inputs in calls:
        loss, metrics = fused_linear_loss(
            hidden, weight, labels, method, bias=b, backend=backend, chunk_size=4, return_metrics=True, **inputs
        )
        assert vars(method).keys() == attributes.keys()
        assert all(vars(method)[key] is value for key, value in attributes.items())
        results.append((loss.detach(), metrics))
    loss, metrics = fused_linear_loss(
        hidden, weight, labels, method_class(), bias=b, backend=backend, chunk_size=4, return_metrics=True, **calls[1]
    )
    torch.testing.assert_close(results[1][0], loss.detach(), rtol=0, atol=0)
    assert results[1][1] == metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("upstream", [3.0, -0.25])
def test_non_unit_upstream_gradient(method, backend, upstream):
    hidden, weight, b, labels, token_weights = make_inputs((3, 5), seed=7)
    _, grads = assert_fused_matches(
        method, backend, hidden, weight, b, labels, token_weights, tol=1e-9, upstream=upstream, chunk_size=4
    )
    # and through .backward(), accumulating into .grad
    loss = fused_linear_loss(
        hidden, weight, labels, method, bias=b, backend=backend, chunk_size=4, **method_inputs(method, token_weights)
    )
    (upstream * loss).backward()
    for leaf, grad in zip(leaves(hidden, weight, b), grads):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------------- edge cases


def _ignore_rows(labels, rows):
    labels = labels.clone()
    labels[rows] = IGNORE
    return labels


EDGE_CASES = {
    # whole sequences (and positions) without any supervised token
    "unsupervised-rows": dict(shape=(4, 6), chunk=4, labels=lambda y: _ignore_rows(y, [0, 2])),
    "unsupervised-rows-flat": dict(shape=(24,), chunk=5, labels=lambda y: _ignore_rows(y, slice(3, 15))),
    # V not a multiple of anything, and the number of supervised rows (13) not a multiple of the chunk (4)
    "rows-not-multiple-of-chunk": dict(shape=(13,), V=37, chunk=4, ignore_frac=0.0),
    "single-row": dict(shape=(1,), chunk=4, ignore_frac=0.0),
    "single-row-BT": dict(shape=(1, 1), chunk=1, ignore_frac=0.0),
    "chunk-larger-than-N": dict(shape=(2, 5), chunk=1000),
    "chunk-1": dict(shape=(2, 5), chunk=1),
    "tiny-vocab": dict(shape=(9,), V=2, chunk=4, ignore_frac=0.0),
}


@pytest.mark.parametrize("case", EDGE_CASES.values(), ids=EDGE_CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_edge_cases(method, backend, case):
    hidden, weight, b, labels, token_weights = make_inputs(
        case["shape"], V=case.get("V", 37), seed=11, ignore_frac=case.get("ignore_frac", 0.25)
    )
    if "labels" in case:
        labels = case["labels"](labels)
    assert (labels != IGNORE).any()
    for num_items in (None, 50):
        _, grads = assert_fused_matches(
            method,
            backend,
            hidden,
            weight,
            b,
            labels,
            token_weights,
            tol=1e-9,
            chunk_size=case["chunk"],
            num_items_in_batch=num_items,
        )
        # the hidden states of unsupervised positions get exactly zero gradient
        assert torch.count_nonzero(grads[0][labels == IGNORE]) == 0


@pytest.mark.parametrize(
    "num_items", [None, 8, 0, "tensor", "tensor0"], ids=["mean", "int", "zero", "tensor", "tensor-zero"]
)
@pytest.mark.parametrize("shape", [(2, 4), (8,)], ids=["BTD", "ND"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_no_supervised_token_at_all(method, backend, shape, num_items):
    hidden, weight, b, labels, token_weights = make_inputs(shape, seed=12)
    labels = torch.full_like(labels, IGNORE)
    n = {"tensor": torch.tensor(8), "tensor0": torch.tensor(0)}.get(num_items, num_items)
    fused = fused_fn(method, backend, labels, token_weights, chunk_size=3, num_items_in_batch=n, return_metrics=True)
    loss, metrics = fused(hidden, weight, b)
    grads = torch.autograd.grad(loss, [hidden, weight, b])
    assert loss.item() == 0.0 and not torch.isnan(loss)
    for grad, leaf in zip(grads, (hidden, weight, b)):
        assert grad.shape == leaf.shape
        assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0
    assert metrics["num_tokens"] == 0
    assert all(value == value for value in metrics.values())  # no NaN metric


# ------------------------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs(method, backend):
    hidden, weight, b, labels, token_weights = make_inputs((4, 16), V=53, D=16, dtype=torch.bfloat16, seed=13)
    inputs = (hidden, weight, b)
    loss, grads, _ = loss_and_grads(fused_fn(method, backend, labels, token_weights, chunk_size=5), inputs)
    exp_loss, exp_grads, _ = loss_and_grads(functional_fn(method, labels, token_weights), float64_copies(inputs))
    assert loss.dtype == torch.float32
    # chunked and reference upcast before the matmul; triton keeps bf16 logit tiles (cuBLAS's output, as TRL's and
    # Liger's heads do), so its logits carry bf16 rounding: a looser bound against the exact loss ...
    loss_tol, grad_tol = (1e-2, 3e-2) if backend == "triton" else (1e-3, 2e-2)
    assert abs(loss.double() - exp_loss) <= loss_tol * abs(exp_loss)
    for grad, exp, leaf in zip(grads, exp_grads, (hidden, weight, b)):
        assert grad.dtype == torch.bfloat16 and grad.shape == leaf.shape
        assert torch.isfinite(grad).all()
        assert (grad.double() - exp).norm() <= grad_tol * exp.norm()
    if backend == "triton":
        # ... and a tight one against the same loss on bf16-rounded logits: nothing else is lost in the kernel
        logits = (hidden.detach() @ weight.detach().t() + b.detach()).double()
        rounded = functional(method, logits.bfloat16().double(), labels, None, token_weights)
        assert abs(loss.double() - rounded) <= 1e-5 * abs(rounded)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_float32_inputs(method, backend):
    hidden, weight, b, labels, token_weights = make_inputs((4, 16), V=53, D=16, dtype=torch.float32, seed=14)
    loss, grads = assert_fused_matches(
        method, backend, hidden, weight, b, labels, token_weights, tol=1e-5, chunk_size=5
    )
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)


# ------------------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("shape", [(3, 9), (27,)], ids=["BTD", "ND"])
@pytest.mark.parametrize("method", METHODS)
def test_metrics_match_materialised_logits(method, shape):
    hidden, weight, b, labels, token_weights = make_inputs(shape, V=29, seed=15)
    logits = (hidden @ weight.t() + b).detach()
    # make roughly half the supervised labels the argmax so token_accuracy is strictly between 0 and 1
    flip = torch.arange(labels.numel()).view(labels.shape) % 2 == 0
    labels = torch.where(flip & (labels != IGNORE), logits.argmax(-1), labels)
    mask = labels != IGNORE

    log_p = torch.log_softmax(logits[mask], -1)
    y = labels[mask]
    p_y = log_p.gather(1, y.unsqueeze(1)).squeeze(1).exp()
    expected = {
        "label_prob": p_y.mean().item(),
        "entropy": -(log_p.exp() * log_p).sum(-1).mean().item(),
        "token_accuracy": (log_p.argmax(-1) == y).double().mean().item(),
        "num_tokens": int(mask.sum()),
    }
    if method == "dft":
        expected["dft_weight"] = p_y.mean().item()
    if method == "weighted":
        expected["token_weight"] = token_weights[mask].mean().item()
    assert 0 < expected["token_accuracy"] < 1

    results = {}
    for backend in BACKENDS:
        loss, metrics = fused_fn(method, backend, labels, token_weights, chunk_size=4, return_metrics=True)(
            hidden, weight, b
        )
        assert set(metrics) == set(expected)
        assert metrics["num_tokens"] == expected["num_tokens"] and isinstance(metrics["num_tokens"], int)
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (backend, name)
        # metrics do not change the loss
        inputs = method_inputs(method, token_weights)
        plain = fused_linear_loss(hidden, weight, labels, method, bias=b, backend=backend, chunk_size=4, **inputs)
        assert loss.item() == plain.item()
        results[backend] = metrics
    for name in expected:
        assert results["chunked"][name] == pytest.approx(results["reference"][name], rel=1e-9, abs=1e-12)


# -------------------------------------------------------------------------------------------------------- memory


def _largest_tensor(method, backend, n_rows, V=50_000, D=16, chunk=64, return_metrics=False):
    g = gen(16)
    hidden = torch.randn(n_rows, D, generator=g).requires_grad_(True)
    weight = (0.1 * torch.randn(V, D, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (n_rows,), generator=g)
    inputs = {"token_weights": torch.rand(n_rows, generator=g)} if method == "weighted" else {}
    with LargestTensor() as mode:
        out = fused_linear_loss(
            hidden,
            weight,
            labels,
            method,
            backend=backend,
            chunk_size=chunk,
            return_metrics=return_metrics,
            **inputs,
        )
        loss = out[0] if return_metrics else out
        grads = torch.autograd.grad(loss, [hidden, weight])
    assert all(torch.isfinite(grad).all() for grad in grads)
    return mode


@pytest.mark.parametrize("method, return_metrics", [("sft", False), ("sft", True), ("dft", True), ("weighted", True)])
def test_chunked_never_holds_more_than_a_tile(method, return_metrics):
    N, V, chunk = 512, 50_000, 64
    mode = _largest_tensor(method, "chunked", N, V=V, chunk=chunk, return_metrics=return_metrics)
    logit_tiles = [shape for shape in mode.matmul_outputs if shape[-1] == V]  # h @ W.T, one per tile
    assert logit_tiles and all(shape == (chunk, V) for shape in logit_tiles)
    assert len(logit_tiles) == N // chunk
    assert mode.largest <= chunk * V < N * V


def test_chunked_backward_hands_over_its_gradients_without_a_copy():
    """`loss.backward()` (upstream gradient 1) makes the weight gradient computed in the forward `weight.grad` as it
    is: one weight-sized allocation per call, not a second copy at the end of backward. With retain_graph a second
    backward still starts from intact gradients."""
    N, V, D, chunk = 64, 5_000, 8, 16
    g = gen(21)
    hidden = torch.randn(N, D, generator=g).requires_grad_(True)
    weight = (0.1 * torch.randn(V, D, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    with LargestTensor() as mode:
        fused_linear_loss(hidden, weight, labels, "sft", backend="chunked", chunk_size=chunk).backward()
    assert sum(numel == V * D for numel in mode.allocated) == 1
    once = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    loss = fused_linear_loss(hidden, weight, labels, "sft", backend="chunked", chunk_size=chunk)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * once[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(weight.grad, 2 * once[1], rtol=1e-6, atol=0)


def test_reference_holds_the_full_logits():
    """The same probe on the reference backend sees [N, V]: the check above can fail."""
    N, V, chunk = 256, 50_000, 64
    mode = _largest_tensor("sft", "reference", N, V=V, chunk=chunk)
    assert (N, V) in mode.matmul_outputs
    assert mode.largest >= N * V > chunk * V


# ---------------------------------------------------------------------------------------------------- bad inputs


def _valid_call(backend, method="sft"):
    """A valid call (V=37, D=8, hidden [2, 5, 8]); each bad case changes one thing in it."""
    g = gen(17)
    call = dict(
        hidden=torch.randn(2, 5, 8, generator=g),
        weight=torch.randn(37, 8, generator=g),
        labels=torch.randint(0, 37, (2, 5), generator=g),
        method=method,
        backend=backend,
        chunk_size=4,
    )
    if method == "weighted":
        call["token_weights"] = torch.ones(2, 5)
    return call


def _call(call):
    call = dict(call)
    return fused_linear_loss(call.pop("hidden"), call.pop("weight"), call.pop("labels"), call.pop("method"), **call)


def _with_label(value):
    labels = _valid_call("chunked")["labels"].clone()
    labels[1, 3] = value
    return labels


BAD_INPUTS = {
    "unknown-method": (dict(method="nope"), r"Unknown loss method 'nope'"),
    "unknown-backend": (dict(backend="cuda-magic"), r"Unknown loss backend 'cuda-magic'"),
    "chunk-zero": (dict(chunk_size=0), r"`chunk_size` must be a positive integer"),
    "chunk-negative": (dict(chunk_size=-1), r"`chunk_size` must be a positive integer"),
    "chunk-float": (dict(chunk_size=4.0), r"`chunk_size` must be a positive integer"),
    "chunk-str": (dict(chunk_size="4"), r"`chunk_size` must be a positive integer"),
    "label-V": (dict(labels=_with_label(37)), r"`labels` holds 37, outside the vocabulary \[0, 37\)"),
    "label-negative": (dict(labels=_with_label(-5)), r"`labels` holds -5, outside the vocabulary \[0, 37\)"),
    "hidden-weight-dim": (
        dict(weight=torch.randn(37, 9)),
        r"`weight` has shape \(37, 9\) but `hidden` has dimension 8",
    ),
    "weight-1d": (dict(weight=torch.randn(37)), r"`weight` has shape \(37,\)"),
    "labels-shape": (dict(labels=torch.zeros(2, 6, dtype=torch.long)), r"`hidden` \(2, 5, 8\) and `labels` \(2, 6\)"),
    "labels-flat-for-BTD": (dict(labels=torch.zeros(10, dtype=torch.long)), r"do not match"),
    "labels-float": (dict(labels=torch.zeros(2, 5)), r"`labels` must hold integer token ids"),
    "bias-shape": (dict(bias=torch.randn(36)), r"`bias` has shape \(36,\); it must be \[V\] = \[37\]"),
    "bias-2d": (dict(bias=torch.randn(1, 37)), r"`bias` has shape \(1, 37\)"),
    "weights-shape": (dict(method="weighted", token_weights=torch.ones(2, 4)), r"`token_weights` has shape \(2, 4\)"),
    "weights-negative": (
        dict(method="weighted", token_weights=torch.ones(2, 5).index_fill_(1, torch.tensor([2]), -1.0)),
        r"`token_weights` holds negative values",
    ),
    "weights-nan": (
        dict(method="weighted", token_weights=torch.ones(2, 5).index_fill_(1, torch.tensor([2]), float("nan"))),
        r"`token_weights` holds NaN",
    ),
    "weights-missing": (dict(method="weighted", token_weights=None), r"Method 'weighted' needs `token_weights`"),
    "sft-with-weights": (dict(token_weights=torch.ones(2, 5)), r"'sft' takes no inputs.*token_weights"),
    "dft-with-weights": (dict(method="dft", token_weights=torch.ones(2, 5)), r"'dft' takes no inputs.*token_weights"),
    "weighted-extra": (
        dict(method="weighted", token_weights=torch.ones(2, 5), temperature=1.0),
        r"'weighted' got an unexpected input.*temperature",
    ),
    "num-items-str": (dict(num_items_in_batch="8"), r"`num_items_in_batch` must be a number or a tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_valid_call_used_by_bad_input_cases_works(method, backend):
    """The bad-input cases below each change one thing in this call, so each error is about that one defect."""
    loss = _call(_valid_call(backend, method))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(overrides, match, backend):
    call = _valid_call(backend)
    call.update(overrides)
    if call.get("token_weights", 0) is None:
        del call["token_weights"]
    with pytest.raises(ValueError, match=match):
        _call(call)


# ------------------------------------------------------------------------------------------------------- no_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_no_grad_returns_a_plain_loss(method, backend):
    hidden, weight, b, labels, token_weights = make_inputs((3, 5), seed=18)
    kwargs = dict(bias=b, backend=backend, chunk_size=4, **method_inputs(method, token_weights))
    with torch.no_grad():
        loss = fused_linear_loss(hidden, weight, labels, method, **kwargs)
    assert loss.grad_fn is None and not loss.requires_grad
    with_grad = fused_linear_loss(hidden, weight, labels, method, **kwargs)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(loss, with_grad.detach(), rtol=1e-12, atol=1e-12)
    assert all(leaf.grad is None for leaf in (hidden, weight, b))


def _chunked_matmuls(trainable, no_grad=False):
    """Matmuls (mm/addmm) one chunked call makes over 12 supervised rows in tiles of 4 (3 tiles)."""
    hidden, weight, b, labels, _ = make_inputs((12,), ignore_frac=0.0, seed=19)
    hidden, weight, b = (t.detach().requires_grad_(name in trainable) for name, t in zip("hwb", (hidden, weight, b)))
    with LargestTensor() as mode, torch.set_grad_enabled(not no_grad):
        loss = fused_linear_loss(hidden, weight, labels, "sft", bias=b, backend="chunked", chunk_size=4)
    assert loss.requires_grad == (bool(trainable) and not no_grad)
    return len(mode.matmul_outputs)


@pytest.mark.parametrize(
    "trainable, no_grad, per_tile",
    [
        ("hwb", False, 3),  # logits, grad_hidden, grad_weight (the bias gradient is a sum)
        ("", False, 1),  # nothing needs a gradient: logits only
        ("hwb", True, 1),  # evaluation under no_grad: logits only
        ("hb", False, 2),  # frozen lm_head (LoRA): no grad_weight matmul
        ("w", False, 2),  # frozen hidden states: no grad_hidden matmul
    ],
    ids=["train", "frozen-all", "no-grad", "frozen-weight", "frozen-hidden"],
)
def test_chunked_computes_only_the_gradients_needed(trainable, no_grad, per_tile):
    assert _chunked_matmuls(trainable, no_grad) == 3 * per_tile


@pytest.mark.parametrize("trainable", ["h", "w", "b", "hb", "wb"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_of_a_subset_of_inputs(method, backend, trainable):
    hidden, weight, b, labels, token_weights = make_inputs((3, 5), seed=20)
    hidden, weight, b = (t.detach().requires_grad_(name in trainable) for name, t in zip("hwb", (hidden, weight, b)))
    loss = fused_linear_loss(
        hidden, weight, labels, method, bias=b, backend=backend, chunk_size=4, **method_inputs(method, token_weights)
    )
    loss.backward()
    h, w, bb = (t.detach().requires_grad_(True) for t in (hidden, weight, b))
    functional(method, h @ w.t() + bb, labels, None, token_weights).backward()
    for name, leaf, exp in zip("hwb", (hidden, weight, b), (h, w, bb)):
        if name in trainable:
            torch.testing.assert_close(leaf.grad, exp.grad, rtol=1e-9, atol=1e-9)
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("method", METHODS)
def test_no_grad_metrics_equal_grad_metrics(method):
    hidden, weight, b, labels, token_weights = make_inputs((3, 5), seed=21)
    kwargs = dict(bias=b, backend="chunked", chunk_size=4, return_metrics=True, **method_inputs(method, token_weights))
    loss, metrics = fused_linear_loss(hidden, weight, labels, method, **kwargs)
    with torch.no_grad():
        loss_ng, metrics_ng = fused_linear_loss(hidden, weight, labels, method, **kwargs)
    assert loss_ng.item() == pytest.approx(loss.item(), rel=1e-12)
    assert metrics_ng == pytest.approx(metrics, rel=1e-12)


def test_bool_chunk_size_is_refused():
    hidden, weight, labels = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_loss(hidden, weight, labels, "sft", chunk_size=True)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("method", ["sft", "dft", "weighted"])
def test_metric_names_do_not_depend_on_supervised_rows(backend, method):
    """Processes gather metrics by name under DDP: a batch without supervised tokens must report the same names."""
    hidden, weight = torch.randn(2, 3, 4), torch.randn(7, 4)
    inputs = {"token_weights": torch.ones(2, 3)} if method == "weighted" else {}
    some = torch.tensor([[1, -100, 2], [-100, 3, 4]])
    none = torch.full((2, 3), -100)
    _, with_rows = fused_linear_loss(hidden, weight, some, method, backend=backend, return_metrics=True, **inputs)
    _, without = fused_linear_loss(hidden, weight, none, method, backend=backend, return_metrics=True, **inputs)
    assert sorted(without) == sorted(with_rows)
    assert without["num_tokens"] == 0 and all(value == 0 for value in without.values())
