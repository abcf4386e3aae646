"""The functional losses (`hf_plugins.losses`) against values computed by hand or by `torch.nn.functional`.

These are the readable definitions every backend of the fused head is tested against, so they are pinned here
independently: cross-entropy from torch, DFT's closed-form gradient, weighted SFT's relation to SFT, the reduction
convention and the shape conventions.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from testing_utils import IGNORE, gen

from hf_plugins.losses import dft_loss, sft_loss, weighted_sft_loss


V = 11


def _logits_labels(shape=(3, 5), vocab=V, seed=0, ignore_frac=0.3, dtype=torch.float64):
    g = gen(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    labels.view(-1)[0] = 1  # at least one supervised token
    labels.view(-1)[-1] = IGNORE  # at least one ignored token
    return logits, labels


def _close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _token_nll(logits, labels):
    """-log p(label) per position (0 where ignored), via torch's cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(
        labels.shape
    )


# ------------------------------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("shape", [(3, 5), (15,)], ids=["BT", "N"])
def test_sft_equals_cross_entropy(shape):
    logits, labels = _logits_labels(shape)
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE)
    _close(sft_loss(logits, labels), expected)


def test_sft_hand_computed():
    # uniform logits: -log(1/4); logits (0, log 3): p(1) = 3/4
    logits = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9], [5.0, 1.0, 2.0, 3.0]],
        dtype=torch.float64,
    )
    labels = torch.tensor([2, 1, IGNORE])
    expected = (math.log(4.0) - math.log(0.75)) / 2
    assert sft_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    assert sft_loss(logits, labels, num_items_in_batch=5).item() == pytest.approx(
        (math.log(4.0) - math.log(0.75)) / 5, rel=1e-12
    )


def test_sft_gradient_is_softmax_minus_onehot():
    logits, labels = _logits_labels()
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(sft_loss(logits, labels), logits)
    mask = labels != IGNORE
    p = torch.softmax(logits.detach(), -1)
    onehot = F.one_hot(labels.clamp(min=0), V).to(p.dtype)
    expected = (p - onehot) * mask.unsqueeze(-1) / mask.sum()
    _close(grad, expected)


# ------------------------------------------------------------------------------------------------------------- DFT


@pytest.mark.parametrize("num_items", [None, 7, "tensor"])
def test_dft_value_and_gradient_closed_form(num_items):
    logits, labels = _logits_labels()
    mask = labels != IGNORE
    if num_items == "tensor":
        num_items, count = torch.tensor(9), 9
    else:
        count = num_items if num_items is not None else int(mask.sum())
    logits.requires_grad_(True)
    loss = dft_loss(logits, labels, num_items_in_batch=num_items)
    (grad,) = torch.autograd.grad(loss, logits)

    p = torch.softmax(logits.detach(), -1)
    onehot = F.one_hot(labels.clamp(min=0), V).to(p.dtype)
    p_y = (p * onehot).sum(-1) * mask
    expected_loss = (p_y * _token_nll(logits.detach(), labels)).sum() / count
    expected_grad = p_y.unsqueeze(-1) * (p - onehot) * mask.unsqueeze(-1) / count
    _close(loss, expected_loss)
    _close(grad, expected_grad)


def test_dft_hand_computed():
    logits = torch.zeros(2, 4, dtype=torch.float64)  # p(y) = 1/4 everywhere
    labels = torch.tensor([3, 0])
    assert dft_loss(logits, labels).item() == pytest.approx(0.25 * math.log(4.0), rel=1e-12)


def test_dft_is_not_the_gradient_of_p_log_p():
    """DFT's weight sg(p_y) is detached: its gradient differs from that of the undetached -p_y log p_y."""
    logits, labels = _logits_labels()
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(dft_loss(logits, labels), logits)
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    undetached = -(logp.exp() * logp * mask).sum() / mask.sum()
    (grad_undetached,) = torch.autograd.grad(undetached, logits)
    assert not torch.allclose(grad, grad_undetached, rtol=1e-3, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- weighted


@pytest.mark.parametrize("shape", [(3, 5), (15,)], ids=["BT", "N"])
def test_weighted_all_ones_equals_sft(shape):
    logits, labels = _logits_labels(shape)
    logits.requires_grad_(True)
    weighted = weighted_sft_loss(logits, labels, torch.ones(shape, dtype=torch.float64))
    sft = sft_loss(logits, labels)
    _close(weighted, sft)
    _close(torch.autograd.grad(weighted, logits)[0], torch.autograd.grad(sft, logits)[0])


def test_weighted_zero_weights_drop_tokens_but_keep_the_count():
    logits, labels = _logits_labels(seed=3)
    mask = labels != IGNORE
    keep = torch.rand(labels.shape, generator=gen(1)) < 0.5
    keep.view(-1)[0] = True
    weights = keep.double()
    weights[~mask] = 123.0  # a weight at an ignored position does not matter
    rest = labels.masked_fill(~keep, IGNORE)
    n_rest, n_all = int((rest != IGNORE).sum()), int(mask.sum())
    assert 0 < n_rest < n_all
    _close(weighted_sft_loss(logits, labels, weights), sft_loss(logits, rest) * n_rest / n_all)


def test_weighted_general_weights_hand_computed():
    logits, labels = _logits_labels(seed=4)
    mask = labels != IGNORE
    weights = torch.rand(labels.shape, generator=gen(2), dtype=torch.float64) * 3
    expected = (weights * _token_nll(logits, labels)).sum() / mask.sum()
    _close(weighted_sft_loss(logits, labels, weights), expected)
    _close(weighted_sft_loss(logits, labels, weights, num_items_in_batch=40), expected * mask.sum() / 40)


# ------------------------------------------------------------------------------------------- shared conventions

LOSSES = {
    "sft": lambda logits, labels, **kw: sft_loss(logits, labels, **kw),
    "dft": lambda logits, labels, **kw: dft_loss(logits, labels, **kw),
    "weighted": lambda logits, labels, **kw: weighted_sft_loss(
        logits, labels, torch.linspace(0.5, 2.0, labels.numel(), dtype=torch.float64).view(labels.shape), **kw
    ),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_items", [1, 6, 1000, "tensor"])
def test_num_items_in_batch_divides_the_sum(name, num_items):
    logits, labels = _logits_labels()
    count = int((labels != IGNORE).sum())
    n = 17 if num_items == "tensor" else num_items
    arg = torch.tensor(17) if num_items == "tensor" else num_items
    total = LOSSES[name](logits, labels) * count
    _close(LOSSES[name](logits, labels, num_items_in_batch=arg), total / n)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_items", [None, 4, 0, "tensor", "tensor0"])
def test_all_ignored_gives_zero_and_zero_grads(name, num_items):
    logits, labels = _logits_labels()
    labels = torch.full_like(labels, IGNORE)
    logits.requires_grad_(True)
    arg = {"tensor": torch.tensor(4), "tensor0": torch.tensor(0)}.get(num_items, num_items)
    loss = LOSSES[name](logits, labels, num_items_in_batch=arg)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("name", LOSSES)
def test_bt_and_flat_shapes_agree(name):
    logits, labels = _logits_labels((3, 5))
    flat_logits, flat_labels = logits.reshape(15, V), labels.reshape(15)
    assert LOSSES[name](logits, labels).dim() == 0
    _close(LOSSES[name](logits, labels), LOSSES[name](flat_logits, flat_labels))
    _close(
        LOSSES[name](logits, labels, num_items_in_batch=9),
        LOSSES[name](flat_logits, flat_labels, num_items_in_batch=9),
    )


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_logits_are_computed_in_float32(name):
    logits, labels = _logits_labels(dtype=torch.bfloat16)
    loss = LOSSES[name](logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), LOSSES[name](logits.double(), labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [V, -5])
def test_out_of_vocabulary_label_raises(name, bad):
    logits, labels = _logits_labels()
    labels.view(-1)[2] = bad
    with pytest.raises(ValueError, match=rf"holds {bad}, outside the vocabulary \[0, {V}\)"):
        LOSSES[name](logits, labels)


@pytest.mark.parametrize(
    "make_weights, match",
    [
        (lambda s: torch.ones(s[0], s[1] + 1), r"`token_weights` has shape"),
        (lambda s: torch.ones(s).index_fill_(1, torch.tensor([1]), -0.5), r"negative"),
        (lambda s: torch.ones(s).index_fill_(1, torch.tensor([1]), float("nan")), r"NaN"),
        (lambda s: torch.ones(s).index_fill_(1, torch.tensor([1]), float("inf")), r"infinite"),
        (lambda s: [[1.0] * s[1]] * s[0], r"must be a tensor"),
    ],
    ids=["shape", "negative", "nan", "inf", "not-a-tensor"],
)
def test_weighted_bad_weights_raise(make_weights, match):
    logits, labels = _logits_labels()
    with pytest.raises(ValueError, match=match):
        weighted_sft_loss(logits, labels, make_weights(tuple(labels.shape)))
