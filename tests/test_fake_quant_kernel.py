"""The Triton fake-quantisation kernel against the torch reference, value for value (rtol=0, atol=0).

On CPU the kernel runs under `TRITON_INTERPRET=1` (set by conftest.py when there is no GPU), on CPU tensors; the
`gpu` tests run it compiled, at the sizes of real models, through `fake_quantize_values`' CUDA dispatch.
"""

import pytest
import torch

from hf_plugins.quantization import QuantSpec, fake_quant_kernel, fake_quantize, fake_quantize_values
from hf_plugins.quantization.fake_quant_kernel import fake_quantize_rows
from hf_plugins.quantization.quantizer import fake_quantize_values_reference, use_fake_quant_kernel


SPECS = [
    QuantSpec(4),
    QuantSpec(4, symmetric=False),
    QuantSpec(2, clip_ratio=0.5),
    QuantSpec(3, symmetric=False, clip_ratio=0.9),
    QuantSpec(8),
]


def spec_id(spec):
    return f"{spec.bits}b-{'sym' if spec.symmetric else 'asym'}-clip{spec.clip_ratio}"


def make_rows(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])[torch.randperm(shape[-1], generator=g)]
    x = x.reshape(-1, shape[-1])
    if x.shape[0] >= 4:
        x[0] = 0.0  # a row of zeros: scale 1, all zeros
        x[1] = 2.5  # a constant row
        x[2] = x[2].abs()  # all positive: the asymmetric range is widened to include 0
        x[3, : shape[-1] // 2] = 1e-30  # tiny values next to ordinary ones
    return x.reshape(shape).to(device=device, dtype=dtype)


def check(x, spec):
    got = fake_quantize_rows(x, spec)
    expected = fake_quantize_values_reference(x, spec)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 64, 100])
def test_kernel_matches_the_reference(spec, dtype, n):
    check(make_rows((6, n), dtype), spec)


@pytest.mark.parametrize("spec", SPECS[:2], ids=spec_id)
def test_rows_longer_than_one_block_take_the_two_pass_loop(monkeypatch, spec):
    monkeypatch.setattr(fake_quant_kernel, "MAX_ONE_BLOCK", 32)
    monkeypatch.setattr(fake_quant_kernel, "LOOP_BLOCK", 16)
    for n in (33, 48, 70):  # a partial last block, an exact multiple, several blocks
        check(make_rows((5, n), torch.float32, seed=n), spec)
        check(make_rows((5, n), torch.bfloat16, seed=n), spec)


def test_layouts_ties_and_empty_inputs():
    spec = QuantSpec(4)
    kv = make_rows((2, 3, 5, 8), torch.bfloat16)  # [B, heads, T, head_dim]: per token per head
    check(kv, spec)
    wide = make_rows((4, 16), torch.float32)
    check(wide[:, ::2], spec)  # a last dimension with stride 2 is copied first
    check(wide.t().contiguous().t(), spec)  # rows not contiguous with each other
    # exact halves of the scale: round half to even, as torch.round
    ties = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    check(ties, spec)
    check(torch.zeros(0, 8), spec)


def test_dispatch_uses_the_kernel_only_for_cuda_float_tensors():
    assert not use_fake_quant_kernel(torch.zeros(2, 4))
    assert not use_fake_quant_kernel(torch.zeros(2, 4, dtype=torch.float64))
    x = torch.randn(3, 8, requires_grad=True)
    y = fake_quantize(x, QuantSpec(4))
    torch.testing.assert_close(y, fake_quantize_values_reference(x.detach(), QuantSpec(4)), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2048, 896), (1024, 4864), (64, 14336), (8, 2, 1024, 64)], ids=str)
def test_kernel_on_gpu_matches_the_reference(spec, dtype, shape):
    x = make_rows(shape, dtype, device="cuda")
    assert use_fake_quant_kernel(x)
    torch.testing.assert_close(fake_quantize_values(x, spec), fake_quantize_values_reference(x, spec), rtol=0, atol=0)
    g = torch.randn_like(x)
    leaf = x.clone().requires_grad_(True)
    fake_quantize(leaf, spec).backward(g)
    assert torch.equal(leaf.grad, g)  # straight-through
