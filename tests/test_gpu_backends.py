"""The GPU backends of the fused head (`triton`, `liger`) against the reference on materialised logits.

The small-shape tests of every method on the `triton` backend live beside the other backends' (test_fused_linear_loss,
test_asft, test_otr: on CPU they run the kernel under Triton's interpreter). Here: Liger's backend under the
interpreter, the backend choice and its errors, and the `gpu`-marked tests at realistic shapes, which run where a
CUDA device is present (benchmarks/gpu_check.sh).
"""

import os

import pytest
import testing_utils
import torch
from testing_utils import F64, ON_GPU, gen, needs_triton, random_linear

from hf_plugins.ops import fused_linear_loss
from hf_plugins.ops.liger import liger_available


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def make_inputs(n, v, d, *, dtype, device="cpu", seed=0, ignore_frac=0.2, ref_d=None):
    """Leaves hidden [n, d] and weight [v, d] of `dtype` on `device`, labels, and the other methods' inputs."""
    g = gen(seed)
    hidden, weight, _, labels = testing_utils.make_inputs(
        (n,), v, d, dtype=dtype, device=device, bias=False, ignore_frac=ignore_frac, generator=g
    )
    token_weights = 2 * torch.rand(n, generator=g, dtype=F64)
    ref_hidden, ref_weight, _ = random_linear(g, (n,), v, ref_d or d, bias=False)
    extras = {
        "token_weights": token_weights.to(device),
        "ref_hidden": ref_hidden.to(device=device, dtype=dtype),
        "ref_weight": ref_weight.to(device=device, dtype=dtype),
    }
    return hidden, weight, labels.to(device), extras


def kwargs_for(method, extras, num_samples=4):
    if method == "weighted":
        return {"token_weights": extras["token_weights"]}
    if method == "asft":
        return {"ref_hidden": extras["ref_hidden"], "ref_weight": extras["ref_weight"], "kl_coef": 0.2}
    if method == "otr":
        return {"num_samples": num_samples, "temperature": 1.3, "negative_reward": -0.2}
    return {}


def loss_and_grads(method, backend, hidden, weight, labels, kwargs, seed=7, **extra):
    if method == "otr" and kwargs.get("num_samples") is not None:
        kwargs = {**kwargs, "generator": torch.Generator(device=hidden.device).manual_seed(seed)}
    loss, metrics = fused_linear_loss(
        hidden, weight, labels, method, backend=backend, return_metrics=True, **kwargs, **extra
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grads, metrics


# ------------------------------------------------------------------------------------ liger (interpreter or GPU)


needs_liger = pytest.mark.skipif(not liger_available(), reason="liger-kernel is not installed")


@needs_liger
@needs_triton
@pytest.mark.parametrize("method", ["sft", "dft", "weighted"])
def test_liger_backend_matches_reference(method):
    device = "cuda" if ON_GPU else "cpu"
    hidden, weight, labels, extras = make_inputs(40, 301, 16, dtype=torch.float32, device=device, seed=1)
    kwargs = kwargs_for(method, extras)
    loss, grads, metrics = loss_and_grads(method, "liger", hidden, weight, labels, kwargs)
    exp_loss, exp_grads, exp_metrics = loss_and_grads(method, "reference", hidden, weight, labels, kwargs)
    torch.testing.assert_close(loss.double(), exp_loss.double(), rtol=1e-5, atol=1e-6)
    for grad, exp in zip(grads, exp_grads):
        torch.testing.assert_close(grad.double(), exp.double(), rtol=1e-4, atol=1e-6)
    assert metrics["num_tokens"] == exp_metrics["num_tokens"]
    if "token_accuracy" in metrics:
        assert metrics["token_accuracy"] == pytest.approx(exp_metrics["token_accuracy"], abs=1e-6)


@needs_liger
@needs_triton
def test_liger_backend_refuses_methods_it_does_not_cover():
    hidden, weight, labels, extras = make_inputs(8, 50, 8, dtype=torch.float32, device="cuda" if ON_GPU else "cpu")
    with pytest.raises(ValueError, match="'liger' covers the methods sft, dft, weighted, not 'asft'"):
        fused_linear_loss(hidden, weight, labels, "asft", backend="liger", **kwargs_for("asft", extras))


# --------------------------------------------------------------------------------------------- backend choice


def test_triton_backend_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, labels, _ = make_inputs(6, 20, 4, dtype=torch.float32)
    for backend in ("triton", "liger"):
        with pytest.raises(ValueError, match=f"loss backend '{backend}' needs a CUDA device.*use 'chunked'"):
            fused_linear_loss(hidden, weight, labels, "sft", backend=backend)


def test_auto_is_chunked_on_cpu():
    from hf_plugins.ops.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "chunked"


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter path")
def test_triton_cannot_backward_twice():
    hidden, weight, labels, _ = make_inputs(6, 20, 4, dtype=F64)
    loss = fused_linear_loss(hidden, weight, labels, "sft", backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run backward twice"):
        loss.backward()


# ------------------------------------------------------------------------------------------- GPU, real shapes

GPU_METHODS = [("sft", None), ("dft", None), ("weighted", None), ("asft", None), ("otr", 8), ("otr", None)]


@pytest.mark.gpu
@pytest.mark.parametrize("method,num_samples", GPU_METHODS, ids=[f"{m}-{k}" for m, k in GPU_METHODS])
def test_triton_float64_on_gpu_equals_reference(method, num_samples):
    """Exact arithmetic on the GPU: a vocabulary that is not a multiple of the block, several tiles."""
    hidden, weight, labels, extras = make_inputs(700, 32017, 64, dtype=F64, device="cuda", seed=3)
    kwargs = kwargs_for(method, extras, num_samples)
    loss, grads, metrics = loss_and_grads(method, "triton", hidden, weight, labels, kwargs, chunk_size=256)
    exp_loss, exp_grads, exp_metrics = loss_and_grads(method, "reference", hidden, weight, labels, kwargs)
    torch.testing.assert_close(loss, exp_loss, rtol=1e-10, atol=1e-12)
    for grad, exp in zip(grads, exp_grads):
        torch.testing.assert_close(grad, exp, rtol=1e-9, atol=1e-12)
    assert metrics.keys() == exp_metrics.keys()
    for name, value in exp_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.gpu
@pytest.mark.parametrize("method,num_samples", GPU_METHODS, ids=[f"{m}-{k}" for m, k in GPU_METHODS])
def test_triton_bfloat16_at_qwen_vocab(method, num_samples):
    """bf16 inputs at the Qwen vocabulary: the loss equals the loss on bf16-rounded logits (what cuBLAS writes), the
    gradients are within bf16 rounding of the float32 reference, and no [N, V] buffer is ever allocated."""
    n, v, d = 2048, 151936, 512
    hidden, weight, labels, extras = make_inputs(n, v, d, dtype=torch.bfloat16, device="cuda", seed=4)
    kwargs = kwargs_for(method, extras, num_samples)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grads, _ = loss_and_grads(method, "triton", hidden, weight, labels, kwargs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = n * v * 2
    gradients_bytes = (v * d + n * d) * 2
    assert peak < 0.5 * logits_bytes + 1.5 * gradients_bytes, f"peak {peak / 2**20:.0f} MiB: logits materialised?"
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if method == "otr" and num_samples is not None:
        return  # bf16 and float32 logits sample different tokens; the float64 test checks the sampler exactly
    exp_loss, exp_grads, _ = loss_and_grads(
        method, "reference", *(t.detach().float().requires_grad_(True) for t in (hidden, weight)), labels, kwargs
    )
    assert abs(loss.double() - exp_loss.double()) <= 1e-2 * abs(exp_loss.double()) + 1e-4
    for grad, exp in zip(grads, exp_grads):
        assert (grad.double() - exp.double()).norm() <= 3e-2 * exp.double().norm()


@pytest.mark.gpu
def test_auto_picks_triton_on_gpu():
    from hf_plugins.ops.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "auto"  # decided per method once its inputs are known
    hidden, weight, labels, _ = make_inputs(300, 1000, 32, dtype=torch.float32, device="cuda", seed=5)
    auto = fused_linear_loss(hidden, weight, labels, "sft", backend="auto")
    triton = fused_linear_loss(hidden, weight, labels, "sft", backend="triton")
    assert torch.equal(auto, triton)


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("method", ["sft", "dft", "weighted"])
def test_liger_bfloat16_on_gpu(method):
    hidden, weight, labels, extras = make_inputs(2048, 32000, 512, dtype=torch.bfloat16, device="cuda", seed=6)
    kwargs = kwargs_for(method, extras)
    loss, grads, _ = loss_and_grads(method, "liger", hidden, weight, labels, kwargs)
    exp_loss, exp_grads, _ = loss_and_grads(
        method, "reference", *(t.detach().float().requires_grad_(True) for t in (hidden, weight)), labels, kwargs
    )
    assert abs(loss.double() - exp_loss.double()) <= 1e-2 * abs(exp_loss.double()) + 1e-4
    for grad, exp in zip(grads, exp_grads):
        assert (grad.double() - exp.double()).norm() <= 3e-2 * exp.double().norm()


# ------------------------------------------------------------------ model logit transforms and label smoothing, GPU

GPU_TRANSFORMS = {
    "softcap": dict(softcap=30.0),
    "scale+softcap": dict(scale=1.7, softcap=2.0),
    "scale": dict(scale=0.0625),
}


@pytest.mark.gpu
@pytest.mark.parametrize("transform", GPU_TRANSFORMS.values(), ids=GPU_TRANSFORMS.keys())
@pytest.mark.parametrize("method,num_samples", GPU_METHODS, ids=[f"{m}-{k}" for m, k in GPU_METHODS])
def test_triton_transformed_logits_float64_on_gpu(method, num_samples, transform):
    from hf_plugins.ops import LogitTransform

    transform = LogitTransform(**transform)
    hidden, weight, labels, extras = make_inputs(700, 32017, 64, dtype=F64, device="cuda", seed=7)
    hidden = (4 * hidden.detach()).requires_grad_(True)  # logits of std ~8: a cap of 2 or 30 both bite
    kwargs = kwargs_for(method, extras, num_samples)
    if method == "asft":
        kwargs["ref_logit_transform"] = LogitTransform(scale=0.8, softcap=5.0)
    extra = {"logit_transform": transform}
    loss, grads, _ = loss_and_grads(method, "triton", hidden, weight, labels, kwargs, chunk_size=256, **extra)
    exp_loss, exp_grads, _ = loss_and_grads(method, "reference", hidden, weight, labels, kwargs, **extra)
    torch.testing.assert_close(loss, exp_loss, rtol=1e-10, atol=1e-12)
    for grad, exp in zip(grads, exp_grads):
        torch.testing.assert_close(grad, exp, rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("transform", GPU_TRANSFORMS.values(), ids=GPU_TRANSFORMS.keys())
@pytest.mark.parametrize("method", ["sft", "sft-smoothed", "dft", "weighted"])
def test_liger_soft_cap_scale_and_smoothing_on_gpu(method, transform):
    """Liger's own `softcap` and `label_smoothing`, the scale folded into the hidden states (float32: Liger's kernel
    computes in float32)."""
    from hf_plugins.ops import LogitTransform

    hidden, weight, labels, extras = make_inputs(1024, 32000, 256, dtype=torch.float32, device="cuda", seed=8)
    hidden = (4 * hidden.detach()).requires_grad_(True)
    if method == "sft-smoothed":
        name, kwargs = "sft", {"label_smoothing": 0.1}
    else:
        name, kwargs = method, kwargs_for(method, extras)
    extra = {"logit_transform": LogitTransform(**transform)}
    loss, grads, _ = loss_and_grads(name, "liger", hidden, weight, labels, kwargs, **extra)
    exp_loss, exp_grads, _ = loss_and_grads(name, "reference", hidden, weight, labels, kwargs, **extra)
    torch.testing.assert_close(loss.double(), exp_loss.double(), rtol=1e-5, atol=1e-6)
    for grad, exp in zip(grads, exp_grads):
        torch.testing.assert_close(grad.double(), exp.double(), rtol=1e-4, atol=1e-6)
