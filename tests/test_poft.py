"""PoFT (Preference-oriented SFT): the fused `"poft"` method against `poft_loss`, offline scoring with aligned models
(`score_with_aligned_models`), and `PoFTTrainer` on the tiny offline models.

The fused head must equal the functional loss on materialised logits in value and gradients (float64, every backend),
its logits gradient must be `beta * sigmoid(beta (ref - r) - gamma) / T_i` times the CE gradient, packed rows must give
what padded rows give, and a sequence without a supervised token must never make a NaN. Scoring must equal a
brute-force computation on materialised logits in each aligned model's own tokenisation and chat template, and a
second call must run no model. The trainer must reduce over sequences exactly under gradient accumulation and resume.
"""

import json
import logging
import math
import os
import sys
import textwrap
from functools import partial

import pytest
import testing_utils
import torch
import torch.nn.functional as F
from datasets import Dataset
from testing_utils import (
    BACKENDS,
    CLI_LORA_DROPOUT,
    CPU_ARGS,
    F64,
    IGNORE,
    TORCHRUN,
    LargestTensor,
    as_leaves,
    assert_close_loss_and_grads,
    assert_matches,
    assert_packed_rows,
    assert_same_parameters,
    gen,
    leaves,
    logged,
    logits_of,
    random_linear,
    run_script,
    tiny_lora_config,
    train_and_list_changed_parameters,
    uninterrupted_and_resumed,
)
from transformers import AutoModelForCausalLM

import hf_plugins
from hf_plugins import FusedSFTConfig, PoFTConfig, PoFTTrainer, poft_loss, score_with_aligned_models
from hf_plugins.data.scoring import tokenize_response
from hf_plugins.losses import METHODS, PoFTMethod
from hf_plugins.losses.poft import sequence_ids
from hf_plugins.ops import fused_linear_loss
from hf_plugins.testing import (
    build_tiny_model,
    build_tokenizer,
    tiny_conversational_dataset,
    tiny_prompt_completion_dataset,
)


# A second chat template, unlike ChatML: plain-text role headers and another end-of-turn token
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '### ' + message['role'] + ':\\n' + message['content'] + '<|endoftext|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### assistant:\\n' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------------------- helpers


def make_inputs(B=3, T=7, V=37, D=8, *, bias=True, seed=0, prompt=2, empty_rows=()):
    """hidden [B, T, D], weight [V, D], bias [V] (leaves requiring grad), labels with a -100 prompt of `prompt`
    positions and some padding, and ref scores near the policy's scores (weights neither 0 nor 1)."""
    g = gen(seed)
    hidden, weight, b = as_leaves(*random_linear(g, (B, T), V, D, bias=bias))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :prompt] = IGNORE
    for row in range(B):  # right padding of different lengths
        labels[row, T - (row % 3) :] = IGNORE
    for row in empty_rows:
        labels[row] = IGNORE
    ref_scores = -math.log(V) + 0.5 * torch.randn(B, generator=g, dtype=F64)
    return hidden, weight, b, labels, ref_scores


def functional_fn(labels, ref_scores, **kwargs):
    """`poft_loss` on the materialised logits, as a function of (hidden, weight, bias)."""
    return lambda h, w, b: poft_loss(logits_of(h, w, b), labels, ref_scores, **kwargs)


def fused_fn(labels, ref_scores, backend, chunk_size=4, **kwargs):
    """The fused head as a function of (hidden, weight, bias)."""
    return lambda h, w, b: fused_linear_loss(
        h, w, labels, "poft", bias=b, backend=backend, chunk_size=chunk_size, ref_scores=ref_scores, **kwargs
    )


def functional(hidden, weight, bias, labels, ref_scores, **kwargs):
    h, w, b = (None if t is None else t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    loss = poft_loss(logits_of(h, w, b), labels, ref_scores, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, leaves(h, w, b))


def fused(hidden, weight, bias, labels, ref_scores, backend, chunk_size=4, **kwargs):
    loss = fused_fn(labels, ref_scores, backend, chunk_size, **kwargs)(hidden, weight, bias)
    return loss, torch.autograd.grad(loss, leaves(hidden, weight, bias))


def assert_fused_matches(hidden, weight, bias, labels, ref_scores, backend, *, chunk_size=4, **kwargs):
    """The fused head equals `poft_loss` on float64 materialised logits, in value and gradients."""
    assert_matches(
        fused_fn(labels, ref_scores, backend, chunk_size, **kwargs),
        functional_fn(labels, ref_scores, **kwargs),
        (hidden, weight, bias),
        rtol=1e-10,
        atol=1e-10,
    )


def assert_close_all(got, expected, tol=1e-10):
    assert_close_loss_and_grads(got, expected, rtol=tol, atol=tol)


def per_sequence_mean_nll(logits, labels):
    """Per-sequence-mean SFT: the mean over sequences of each sequence's mean token NLL."""
    mask = labels != IGNORE
    nll = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, 0), reduction="none").masked_fill(~mask, 0)
    trained = mask.sum(1) > 0
    return (nll.sum(1)[trained] / mask.sum(1)[trained]).mean()


# ------------------------------------------------------------------------------------ fused == poft_loss (float64)


def test_poft_is_registered_and_exported():
    assert METHODS["poft"] is PoFTMethod
    assert hf_plugins.poft_loss is poft_loss and callable(hf_plugins.score_with_aligned_models)
    assert hf_plugins.PoFTTrainer is PoFTTrainer and hf_plugins.PoFTConfig is PoFTConfig


@pytest.mark.parametrize("num_items", [None, 5, "tensor"], ids=["mean", "int", "tensor"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_poft_loss_float64(backend, bias, num_items):
    hidden, weight, b, labels, ref = make_inputs(bias=bias, seed=1)
    n = torch.tensor(5) if num_items == "tensor" else num_items
    assert_fused_matches(hidden, weight, b, labels, ref, backend, num_items_in_batch=n)


@pytest.mark.parametrize("beta, gamma", [(1.0, 0.0), (2.5, 0.0), (0.3, 1.5), (1.0, -2.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_poft_loss_for_beta_and_gamma(backend, beta, gamma):
    hidden, weight, b, labels, ref = make_inputs(B=4, T=6, seed=2)
    assert_fused_matches(hidden, weight, b, labels, ref, backend, chunk_size=3, beta=beta, gamma=gamma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_rows_are_one_sequence(backend):
    hidden, weight, b, labels, ref = make_inputs(B=1, T=9, seed=3)
    expected = functional(hidden, weight, b, labels, ref)
    loss, grads = fused(hidden[0], weight, b, labels[0], ref, backend)
    assert_close_all((loss, (grads[0].unsqueeze(0), *grads[1:])), expected)


def test_poft_loss_by_hand():
    """`poft_loss` itself against the definition written out per sequence."""
    hidden, weight, b, labels, ref = make_inputs(B=3, T=6, seed=4)
    logits = logits_of(hidden, weight, b).detach()
    beta, gamma = 1.7, 0.4
    losses = []
    for i in range(3):
        mask = labels[i] != IGNORE
        r = torch.log_softmax(logits[i][mask], -1).gather(1, labels[i][mask].unsqueeze(1)).mean()
        losses.append(-torch.log(torch.sigmoid(beta * (r - ref[i]) + gamma)))
    torch.testing.assert_close(poft_loss(logits, labels, ref, beta=beta, gamma=gamma), torch.stack(losses).mean())
    torch.testing.assert_close(
        poft_loss(logits, labels, ref, beta=beta, gamma=gamma, num_items_in_batch=10), torch.stack(losses).sum() / 10
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_gradient_is_weighted_ce_gradient(backend):
    """With hidden = logits (identity lm_head), the hidden-state gradient is the logits gradient:
    `beta * sigmoid(beta (ref - r_i) - gamma) / T_i * (softmax(z_t) - one_hot(y_t))`, over S sequences."""
    V, beta, gamma = 11, 1.3, 0.2
    g = gen(5)
    logits = (2 * torch.randn(3, 6, V, generator=g, dtype=F64)).requires_grad_(True)
    labels = torch.randint(0, V, (3, 6), generator=g)
    labels[:, :2] = IGNORE
    labels[2, 4:] = IGNORE
    ref = torch.tensor([-2.0, -3.0, -2.5], dtype=F64)
    eye = torch.eye(V, dtype=F64, requires_grad=True)
    loss = fused_linear_loss(
        logits, eye, labels, "poft", backend=backend, chunk_size=4, ref_scores=ref, beta=beta, gamma=gamma
    )
    (grad,) = torch.autograd.grad(loss, [logits])

    z = logits.detach()
    mask = labels != IGNORE
    logp = torch.log_softmax(z, -1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
    T = mask.sum(1).to(F64)
    r = picked.sum(1) / T
    c = beta * torch.sigmoid(beta * (ref - r) - gamma) / T
    ce_grad = logp.exp() - F.one_hot(labels.clamp(min=0), V).to(F64)
    expected = (c[:, None, None] * ce_grad * mask[..., None]) / 3
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    # and the functional loss has the same gradient
    (functional_grad,) = torch.autograd.grad(poft_loss(logits, labels, ref, beta=beta, gamma=gamma), [logits])
    torch.testing.assert_close(functional_grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_ref_score_is_per_sequence_mean_sft(backend):
    """ref -> +inf: the weight is 1, so the gradient is per-sequence-mean SFT's (beta = 1) and the value is that SFT
    loss plus the constant `ref`. (ref -> -inf is the other limit: see the next test.)"""
    hidden, weight, b, labels, _ = make_inputs(B=4, T=7, seed=6)
    ref = torch.full((4,), 1e9, dtype=F64)
    loss, grads = fused(hidden, weight, b, labels, ref, backend)
    h, w, bb = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, b))
    sft = per_sequence_mean_nll(logits_of(h, w, bb), labels)
    sft_grads = torch.autograd.grad(sft, [h, w, bb])
    torch.testing.assert_close(loss.detach() - 1e9, sft.detach(), rtol=0, atol=1e-6)
    for grad, exp in zip(grads, sft_grads):
        torch.testing.assert_close(grad, exp, rtol=1e-10, atol=1e-12)
    # the token mean differs when the sequences' lengths differ: this is not plain SFT
    flat = F.cross_entropy(logits_of(h, w, bb)[labels != IGNORE], labels[labels != IGNORE])
    assert abs(float((flat - sft).detach())) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_very_low_ref_score_gives_no_loss_and_no_gradient(backend):
    hidden, weight, b, labels, _ = make_inputs(B=3, seed=7)
    loss, grads = fused(hidden, weight, b, labels, torch.full((3,), -1e9, dtype=F64), backend)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    assert all(float(g.abs().max()) < 1e-300 for g in grads)


def pack(hidden, labels):
    """The sequences of a padded batch (rows, without their padding) packed into one row, with position ids aligned
    with the labels."""
    keep = [int((labels[i] != IGNORE).nonzero().max()) + 1 for i in range(labels.shape[0])]
    packed_hidden = torch.cat([hidden[i, :n] for i, n in enumerate(keep)]).unsqueeze(0)
    packed_labels = torch.cat([labels[i, :n] for i, n in enumerate(keep)]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in keep]).unsqueeze(0)
    return packed_hidden, packed_labels, positions


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_and_padded_batches_give_the_same_loss(backend):
    hidden, weight, b, labels, ref = make_inputs(B=4, T=8, seed=8)
    padded = fused(hidden, weight, b, labels, ref, backend)
    packed_hidden, packed_labels, positions = pack(hidden, labels)
    assert packed_labels.shape[1] < labels.numel()
    packed = fused(packed_hidden, weight, b, packed_labels, ref, backend, position_ids=positions)
    packed_grad_hidden = pack(padded[1][0], labels)[0]  # the padded run's hidden gradient, packed the same way
    assert_close_all(packed, (padded[0].detach(), (packed_grad_hidden, *padded[1][1:])))
    # the functional loss agrees, and without the position ids the packed row would be one sequence
    torch.testing.assert_close(
        poft_loss(logits_of(packed_hidden, weight, b), packed_labels, ref, position_ids=positions), padded[0]
    )
    with pytest.raises(ValueError, match="batch holds 1 sequences"):
        fused(packed_hidden, weight, b, packed_labels, ref, backend)


def test_sequence_ids_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    ids, count = sequence_ids(torch.zeros_like(positions), positions)
    assert count == 5
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 4, 4, 4, 4]]
    ids, count = sequence_ids(torch.zeros(2, 3, dtype=torch.long))
    assert count == 2 and ids.tolist() == [[0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_without_supervised_tokens_is_skipped_not_nan(backend):
    hidden, weight, b, labels, ref = make_inputs(B=4, seed=9, empty_rows=(1,))
    got = fused(hidden, weight, b, labels, ref, backend)
    assert math.isfinite(float(got[0].detach())) and all(torch.isfinite(g).all() for g in got[1])
    # the same as the batch without that row: the mean is over the three trained sequences
    keep = [0, 2, 3]
    expected = functional(hidden[keep].detach(), weight, b, labels[keep], ref[keep])
    torch.testing.assert_close(got[0].detach(), expected[0], rtol=1e-10, atol=1e-10)
    for grad, exp in zip(got[1][1:], expected[1][1:]):
        torch.testing.assert_close(grad, exp, rtol=1e-10, atol=1e-12)
    assert float(got[1][0][1].abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_supervised_token_at_all(backend):
    hidden, weight, b, labels, ref = make_inputs(B=2, seed=10, empty_rows=(0, 1))
    loss, grads = fused(hidden, weight, b, labels, ref, backend)
    assert float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    assert float(poft_loss(logits_of(hidden, weight, b), labels, ref)) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inputs_match_float64(backend):
    hidden, weight, b, labels, ref = make_inputs(seed=11)
    expected = functional(hidden, weight, b, labels, ref)
    h32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (hidden, weight, b))
    loss, grads = fused(h32, w32, b32, labels, ref.float(), backend)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss.double(), expected[0], rtol=1e-5, atol=1e-6)
    for grad, exp in zip(grads, expected[1]):
        torch.testing.assert_close(grad.double(), exp, rtol=1e-4, atol=1e-6)


def test_no_grad_gives_the_same_loss():
    hidden, weight, b, labels, ref = make_inputs(seed=12)
    with torch.no_grad():
        loss = fused_linear_loss(hidden, weight, labels, "poft", bias=b, backend="chunked", ref_scores=ref)
    torch.testing.assert_close(loss, functional(hidden, weight, b, labels, ref)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_are_per_sequence_means_and_plain_nll(backend):
    hidden, weight, b, labels, ref = make_inputs(B=3, T=8, seed=13)
    beta, gamma = 1.5, 0.3
    _, metrics = fused_linear_loss(
        hidden,
        weight,
        labels,
        "poft",
        bias=b,
        backend=backend,
        chunk_size=4,
        ref_scores=ref,
        beta=beta,
        gamma=gamma,
        return_metrics=True,
    )
    logits = logits_of(hidden, weight, b).detach()
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    r = (logp * mask).sum(1) / mask.sum(1)
    assert metrics["reward_margin"] == pytest.approx(float((r - ref).mean()), abs=1e-10)
    assert metrics["policy_score"] == pytest.approx(float(r.mean()), abs=1e-10)
    assert metrics["poft_weight"] == pytest.approx(float(torch.sigmoid(beta * (ref - r) - gamma).mean()), abs=1e-10)
    assert metrics["nll"] == pytest.approx(float(-logp[mask].mean()), abs=1e-10)
    assert metrics["num_tokens"] == int(mask.sum())


def test_chunked_never_holds_full_logits():
    N_rows, V, D = 256, 1000, 16
    g = gen(14)
    hidden = torch.randn(4, N_rows // 4, D, generator=g).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) / 4).requires_grad_(True)
    labels = torch.randint(0, V, (4, N_rows // 4), generator=g)
    with LargestTensor() as tracker:
        loss = fused_linear_loss(
            hidden, weight, labels, "poft", backend="chunked", chunk_size=32, ref_scores=torch.full((4,), -7.0)
        )
        loss.backward()
    # tiles hold whole sequences (64 rows here, more than chunk_size=32): still never the whole batch's logits
    assert tracker.largest <= 64 * V < N_rows * V


def test_tiles_keep_sequences_whole():
    from hf_plugins.ops.chunked import tile_slices

    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3])
    assert tile_slices(12, 5, groups) == [slice(0, 5), slice(5, 11), slice(11, 12)]
    assert tile_slices(12, 100, groups) == [slice(0, 12)]
    assert tile_slices(12, 1, groups) == [slice(0, 3), slice(3, 5), slice(5, 11), slice(11, 12)]
    assert tile_slices(0, 4, groups[:0]) == [slice(0, 0)]
    assert tile_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_one_pass_equals_the_first_pass_form(chunk_size):
    """chunked scores each tile's whole sequences itself (three matmuls); triton-style weights from a first pass
    (the reference's own path forced through `whole_sequence_tiles=False`) give the same loss and gradients."""
    from hf_plugins.losses.poft import PoFTMethod

    hidden, weight, b, labels, ref = make_inputs(B=4, T=9, seed=21)
    one_pass = fused(hidden, weight, b, labels, ref, "chunked", chunk_size=chunk_size)

    class FirstPass(PoFTMethod):
        def prepare(self, rows, **inputs):
            rows.whole_sequence_tiles = False
            return super().prepare(rows, **inputs)

    loss = fused_linear_loss(
        hidden, weight, labels, FirstPass(), bias=b, backend="chunked", chunk_size=chunk_size, ref_scores=ref
    )
    grads = torch.autograd.grad(loss, [t for t in (hidden, weight, b) if t is not None])
    torch.testing.assert_close(loss.detach(), one_pass[0].detach(), rtol=1e-12, atol=1e-12)
    for grad, exp in zip(grads, one_pass[1]):
        torch.testing.assert_close(grad, exp, rtol=1e-10, atol=1e-12)


def _valid():
    hidden, weight, b, labels, ref = make_inputs(seed=15)
    return dict(hidden=hidden, weight=weight, labels=labels, bias=b, ref_scores=ref)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"ref_scores": None}, "needs `ref_scores`.*score_with_aligned_models"),
        ({"ref_scores": torch.zeros(2, dtype=F64)}, "`ref_scores` has shape \\(2,\\).*3 sequences"),
        ({"ref_scores": torch.tensor([0.0, math.nan, 0.0])}, "`ref_scores` holds 1 NaN or infinite"),
        ({"ref_scores": torch.tensor([0.0, math.inf, -math.inf])}, "`ref_scores` holds 2 NaN or infinite"),
        ({"beta": 0.0}, "`beta` must be > 0"),
        ({"beta": math.nan}, "`beta` must be a finite number"),
        ({"gamma": math.inf}, "`gamma` must be a finite number"),
        ({"position_ids": torch.zeros(3, 2, dtype=torch.long)}, "`position_ids` has shape"),
        ({"token_weights": torch.ones(3, 7)}, "unexpected input"),
    ],
)
def test_bad_inputs_raise(overrides, match):
    inputs = {**_valid(), **overrides}
    hidden, weight, labels = inputs.pop("hidden"), inputs.pop("weight"), inputs.pop("labels")
    with pytest.raises(ValueError, match=match):
        fused_linear_loss(hidden, weight, labels, "poft", backend="chunked", **inputs)
    if set(overrides) <= {"ref_scores", "beta", "gamma", "position_ids"}:
        with pytest.raises(ValueError, match=match):
            poft_loss(logits_of(hidden, weight, inputs.pop("bias")), labels, **{"ref_scores": None, **inputs})


def test_valid_call_used_by_the_bad_input_cases_works():
    inputs = _valid()
    hidden, weight, labels = inputs.pop("hidden"), inputs.pop("weight"), inputs.pop("labels")
    assert math.isfinite(float(fused_linear_loss(hidden, weight, labels, "poft", **inputs)))


# ---------------------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def aligned_pair():
    """Two tiny "aligned" models with tokenizers unlike the policy's (384 tokens, seed 0) and unlike each other: 320
    tokens (seed 1) with ChatML, and 300 tokens (seed 2) with a plain-text template."""
    first_tok = build_tokenizer(vocab_size=320, seed=1)
    second_tok = build_tokenizer(vocab_size=300, seed=2)
    second_tok.chat_template = PLAIN_TEMPLATE
    first = build_tiny_model(first_tok, seed=1)
    second = build_tiny_model(second_tok, arch="qwen2", hidden_size=24, seed=2)
    return (first, first_tok), (second, second_tok)


def save_pair(pair, folder):
    paths = []
    for i, (model, tokenizer) in enumerate(pair):
        path = str(folder / f"aligned-{i}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def expected_tokens(example, tokenizer, template):
    """The rendered example's token ids and response mask, built piece by piece (each message's header, content and
    footer tokenized apart), independently of the scorer's offset search. The tiny tokenizers never merge across
    those boundaries (the content starts after a newline and ends before a special token)."""
    messages = example["messages"]
    ids, mask = [], []
    for message in messages:
        if template == "chatml":
            head, tail = f"<|im_start|>{message['role']}\n", "<|im_end|>\n"
        else:
            head, tail = f"### {message['role']}:\n", "<|endoftext|>\n"
        for piece, scored in ((head, False), (message["content"], message["role"] == "assistant"), (tail, False)):
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            mask += [scored] * len(piece_ids)
    return ids, mask


def brute_force_score(model, ids, mask):
    """Mean log-prob of the masked tokens from the model's materialised logits, one example at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    keep = torch.tensor(mask[1:])
    return float(logp[keep].mean())


def test_response_tokens_are_the_assistant_contents_in_each_template(aligned_pair):
    dataset = tiny_conversational_dataset(6, seed=3)
    for (_, tokenizer), template in zip(aligned_pair, ("chatml", "plain")):
        for example in dataset:
            ids, scored = tokenize_response(example, tokenizer)
            exp_ids, exp_mask = expected_tokens(example, tokenizer, template)
            assert ids == exp_ids and scored == exp_mask
            answers = "".join(m["content"] for m in example["messages"] if m["role"] == "assistant")
            assert tokenizer.decode([i for i, s in zip(ids, scored) if s]) == answers


def test_scores_equal_brute_force_on_materialised_logits(aligned_pair, tmp_path):
    dataset = tiny_conversational_dataset(7, seed=4)
    scored = score_with_aligned_models(
        dataset, [m for m, _ in aligned_pair], [t for _, t in aligned_pair], batch_size=3, cache_dir=str(tmp_path)
    )
    assert scored.column_names == [*dataset.column_names, "ref_score"]
    for example, got in zip(dataset, scored["ref_score"]):
        per_model = [
            brute_force_score(model, *expected_tokens(example, tokenizer, template))
            for (model, tokenizer), template in zip(aligned_pair, ("chatml", "plain"))
        ]
        assert per_model[0] != pytest.approx(per_model[1], abs=1e-3)  # the two models really differ
        assert got == pytest.approx(sum(per_model) / 2, abs=1e-5)


def test_prompt_completion_scores_only_the_completion(aligned_pair, tmp_path):
    model, tokenizer = aligned_pair[0]
    for conversational in (False, True):
        dataset = tiny_prompt_completion_dataset(4, seed=5, conversational=conversational)
        scored = score_with_aligned_models(dataset, model, tokenizer, cache_dir=str(tmp_path))
        for example, got in zip(dataset, scored["ref_score"]):
            ids, mask = tokenize_response(example, tokenizer)
            completion = example["completion"] if not conversational else example["completion"][0]["content"]
            assert tokenizer.decode([i for i, s in zip(ids, mask) if s]) == completion
            assert got == pytest.approx(brute_force_score(model, ids, mask), abs=1e-5)


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.base_model.register_forward_hook(self.hook)

    def hook(self, *args):
        self.calls += 1


def test_second_call_hits_the_cache(aligned_pair, tmp_path):
    models, tokenizers = [m for m, _ in aligned_pair], [t for _, t in aligned_pair]
    counters = [ForwardCounter(model) for model in models]
    dataset = tiny_conversational_dataset(8, seed=6)
    first = score_with_aligned_models(dataset, models, tokenizers, batch_size=4, cache_dir=str(tmp_path))
    assert [c.calls for c in counters] == [2, 2]
    again = score_with_aligned_models(dataset, models, tokenizers, batch_size=4, cache_dir=str(tmp_path))
    assert [c.calls for c in counters] == [2, 2]  # nothing ran
    assert list(again["ref_score"]) == list(first["ref_score"]) and again._fingerprint == first._fingerprint
    # other data, or a changed model, miss the cache
    score_with_aligned_models(tiny_conversational_dataset(8, seed=7), models, tokenizers, cache_dir=str(tmp_path))
    assert [c.calls for c in counters] == [3, 3]
    changed = build_tiny_model(tokenizers[0], seed=11)
    counter = ForwardCounter(changed)
    other = score_with_aligned_models(dataset, [changed, models[1]], tokenizers, batch_size=4, cache_dir=str(tmp_path))
    assert counter.calls == 2 and counters[1].calls == 3  # the unchanged model's scores are reused
    assert list(other["ref_score"]) != list(first["ref_score"])
    for c in counters + [counter]:
        c.handle.remove()


def test_models_given_as_paths_are_not_loaded_on_a_cache_hit(aligned_pair, tmp_path, monkeypatch):
    paths = save_pair(aligned_pair, tmp_path)
    dataset = tiny_conversational_dataset(5, seed=8)
    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    by_path = score_with_aligned_models(dataset, paths, cache_dir=str(tmp_path / "cache"))  # tokenizers from the paths
    assert loads == paths
    by_object = score_with_aligned_models(
        dataset, [m for m, _ in aligned_pair], [t for _, t in aligned_pair], cache_dir=str(tmp_path / "other")
    )
    assert list(by_path["ref_score"]) == pytest.approx(list(by_object["ref_score"]), abs=1e-6)
    score_with_aligned_models(dataset, paths, cache_dir=str(tmp_path / "cache"))
    assert loads == paths  # the second call loaded nothing


def test_empty_response_after_truncation_scores_nan_with_a_count(aligned_pair, tmp_path, caplog):
    model, tokenizer = aligned_pair[0]
    dataset = Dataset.from_dict(
        {
            "prompt": ["Question: What is 2 plus 2?\nAnswer:", "Q: " + "What colour is snow? " * 8 + "\nA:"],
            "completion": [" 2 plus 2 is 4.", " The colour of snow is white."],
        }
    )
    with caplog.at_level(logging.WARNING, logger="hf_plugins.data.scoring"):
        scored = score_with_aligned_models(dataset, model, tokenizer, max_length=40, cache_dir=str(tmp_path))
    first, second = scored["ref_score"]
    assert math.isfinite(first) and math.isnan(second)
    assert any("1 of 2 examples have no response token" in r.message for r in caplog.records)


def test_scoring_bad_inputs_raise(aligned_pair, tmp_path):
    model, tokenizer = aligned_pair[0]
    dataset = tiny_conversational_dataset(2)
    with pytest.raises(ValueError, match="already has a `ref_score` column"):
        score_with_aligned_models(dataset.add_column("ref_score", [0.0, 0.0]), model, tokenizer)
    with pytest.raises(ValueError, match="`tokenizers` has 1 entries for 2 models"):
        score_with_aligned_models(dataset, [model, model], [tokenizer])
    with pytest.raises(ValueError, match="no path to load its tokenizer"):
        score_with_aligned_models(dataset, build_tiny_model(tokenizer))
    no_template = build_tokenizer(vocab_size=320, seed=1)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        score_with_aligned_models(dataset, model, no_template, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="must be a `datasets.Dataset`"):
        score_with_aligned_models(dataset.to_iterable_dataset(), model, tokenizer)
    with pytest.raises(ValueError, match="`models` is empty"):
        score_with_aligned_models(dataset, [])


# -------------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def scored_dataset(aligned_pair, tmp_path_factory):
    """16 conversations scored by the two aligned models (shared by the trainer tests)."""
    return score_with_aligned_models(
        tiny_conversational_dataset(16),
        [m for m, _ in aligned_pair],
        [t for _, t in aligned_pair],
        cache_dir=str(tmp_path_factory.mktemp("scores")),
    )


make_trainer = partial(testing_utils.make_trainer, PoFTTrainer, PoFTConfig, init_seed=0, per_device_train_batch_size=4)


def manual_loss(trainer, batch, scope="completion"):
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    if scope == "full":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    cfg = trainer.args
    return poft_loss(logits[:, :-1], labels[:, 1:], batch["ref_score"].double(), beta=cfg.beta, gamma=cfg.gamma)


@pytest.mark.parametrize("scope", ["completion", "full"])
def test_trainer_loss_is_poft_loss_of_the_batch(tiny_model_dir, tmp_path, scored_dataset, scope):
    # under "full", TRL's own labels are the assistant turns (assistant_only_loss=True): the scope must widen them
    extra = {"assistant_only_loss": True} if scope == "full" else {}
    trainer = make_trainer(
        tiny_model_dir, tmp_path, scored_dataset, poft_target_scope=scope, beta=1.5, gamma=0.5, **extra
    )
    assert trainer.args.assistant_only_loss
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["ref_score"].shape == (4,)
    assert (batch["labels"] == IGNORE).any() and (batch["labels"] != IGNORE).any()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss.double(), manual_loss(trainer, batch, scope), rtol=1e-5, atol=1e-6)
    other = manual_loss(trainer, batch, "full" if scope == "completion" else "completion")
    assert abs(float(loss) - float(other)) > 1e-3  # the scopes really differ


def test_assistant_only_loss_follows_the_data_and_the_scope(tiny_model_dir, tmp_path, scored_dataset, aligned_pair):
    assert make_trainer(tiny_model_dir, tmp_path, scored_dataset).args.assistant_only_loss is True
    full = make_trainer(tiny_model_dir, tmp_path, scored_dataset, poft_target_scope="full")
    assert full.args.assistant_only_loss is False
    model, tokenizer = aligned_pair[0]
    prompt_completion = score_with_aligned_models(
        tiny_prompt_completion_dataset(8), model, tokenizer, cache_dir=str(tmp_path / "cache")
    )
    trainer = make_trainer(tiny_model_dir, tmp_path, prompt_completion)
    assert trainer.args.assistant_only_loss is False and trainer.completion_only_loss
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"][:, :3] == IGNORE).all()  # the prompt is not supervised


def test_num_items_in_batch_counts_sequences(tiny_model_dir, tmp_path, scored_dataset):
    trainer = make_trainer(tiny_model_dir, tmp_path, scored_dataset, per_device_train_batch_size=3)
    batches = list(iter(trainer.get_train_dataloader()))[:2]
    batches[0]["labels"][1] = IGNORE  # a sequence without a trained token does not count
    assert int(trainer._get_num_items_in_batch(batches, torch.device("cpu"))) == 2 * 3 - 1


def test_score_then_train_with_lora_and_accumulation(tiny_model_dir, tmp_path, aligned_pair):
    """The end-to-end path: two aligned models with their own tokenizers score the data (offline), then PoFT trains a
    LoRA adapter with gradient accumulation and logs its metrics."""
    paths = save_pair(aligned_pair, tmp_path)
    dataset = score_with_aligned_models(tiny_conversational_dataset(16), paths, cache_dir=str(tmp_path / "cache"))
    lora = tiny_lora_config(target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = make_trainer(
        tiny_model_dir,
        tmp_path / "out",
        dataset,
        peft_config=lora,
        learning_rate=5e-2,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    changed = train_and_list_changed_parameters(trainer)
    assert changed and all("lora_" in name for name in changed)
    losses = logged(trainer)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    weights, margins, nll = logged(trainer, "poft_weight"), logged(trainer, "reward_margin"), logged(trainer, "nll")
    assert len(weights) == len(margins) == len(nll) == 4
    assert all(0 < w < 1 for w in weights) and all(x > 0 for x in nll)
    assert margins[-1] > margins[0]  # the policy gains on the aligned models
    for loss, weight in zip(losses, weights):  # weight ~ sigmoid(-margin) at beta=1, gamma=0
        assert 0.2 < weight < 0.8 and 0.2 < loss < 3.0


def test_gradient_accumulation_4x1_equals_1x4(tiny_model_dir, tmp_path, scored_dataset):
    runs = []
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer = make_trainer(
            tiny_model_dir,
            tmp_path / f"{batch}x{accumulation}",
            scored_dataset,
            beta=2.0,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        if batch == 4:  # the first logged loss is the mean over the first batch's sequences, from the logits
            first_batch = next(iter(trainer.get_train_dataloader()))
            first_loss = float(manual_loss(trainer, first_batch))
        trainer.train()
        runs.append(trainer)
    assert logged(runs[0])[0] == pytest.approx(first_loss, abs=1e-5)
    assert logged(runs[1]) == pytest.approx(logged(runs[0]), abs=1e-6)
    assert_same_parameters(runs[0], runs[1])


@pytest.mark.parametrize("lora_dropout", [None, CLI_LORA_DROPOUT], ids=["full", "lora-dropout"])
def test_resume_from_checkpoint_continues_the_run(tiny_model_dir, tmp_path, scored_dataset, lora_dropout):
    settings = dict(max_steps=4, learning_rate=2e-2)

    def make(output_dir, **overrides):
        peft_config = None if lora_dropout is None else tiny_lora_config(lora_dropout)
        return make_trainer(
            tiny_model_dir, output_dir, scored_dataset, peft_config=peft_config, **settings, **overrides
        )

    full, resumed, _ = uninterrupted_and_resumed(make, tmp_path)
    assert len(logged(resumed)) == 4
    assert logged(resumed)[2:] == pytest.approx(logged(full)[2:], abs=1e-6)
    assert logged(resumed, "reward_margin")[2:] == pytest.approx(logged(full, "reward_margin")[2:], abs=1e-6)


def test_truncation_that_empties_a_response_skips_it_with_a_count(tiny_model_dir, tmp_path, aligned_pair, caplog):
    model, tokenizer = aligned_pair[0]
    long_prompt = [
        {"role": "user", "content": "What colour is snow? " * 12},
        {"role": "assistant", "content": "White."},
    ]
    rows = list(tiny_conversational_dataset(6, multi_turn=False)["messages"]) + [long_prompt]
    dataset = score_with_aligned_models(
        Dataset.from_dict({"messages": rows}), model, tokenizer, cache_dir=str(tmp_path / "cache")
    )
    assert all(math.isfinite(x) for x in dataset["ref_score"])  # the scorer saw it whole
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tiny_model_dir, tmp_path, dataset, max_length=40, max_steps=2)
    assert len(trainer.train_dataset) == 6
    assert any("1 of 7 examples" in r.message and "are skipped" in r.message for r in caplog.records)
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer))


def test_trainer_bad_datasets_raise(tiny_model_dir, tmp_path, scored_dataset):
    with pytest.raises(ValueError, match="no `ref_score` column.*score_with_aligned_models"):
        make_trainer(tiny_model_dir, tmp_path, tiny_conversational_dataset(4))
    bad = scored_dataset.select(range(4)).map(
        lambda row, i: {"ref_score": math.nan if i == 2 else row["ref_score"]}, with_indices=True
    )
    with pytest.raises(ValueError, match="holds 1 NaN or infinite.*dataset.filter"):
        make_trainer(tiny_model_dir, tmp_path, bad)


@pytest.mark.parametrize("scope", ["completion", "full"])
@pytest.mark.parametrize("batching", ["packing", "padding_free"])
def test_packed_and_padding_free_training_equal_padded_training(
    tiny_model_dir, tmp_path, scored_dataset, scope, batching
):
    """One full batch a step, so both runs train on the same sequences: packed (`bfd`, several sequences a row, all
    flattened into one padding-free row) or padding-free, each sequence must get its own score, and the mean must be
    over sequences, not rows."""
    settings = dict(
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        optim="sgd",
        learning_rate=2.0,
        beta=1.5,
        poft_target_scope=scope,
    )
    padded = make_trainer(tiny_model_dir, tmp_path / "padded", scored_dataset, **settings)
    flat = dict(packing=True, max_length=256) if batching == "packing" else dict(padding_free=True, max_length=None)
    packed = make_trainer(tiny_model_dir, tmp_path / batching, scored_dataset, **settings, **flat)
    assert_packed_rows(padded, packed, batching == "packing", fewer_than=16)
    batch = next(iter(packed.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["ref_score"].shape == batch["input_ids"].shape
    device = torch.device("cpu")
    assert int(packed._get_num_items_in_batch([batch], device)) == 16  # sequences, not rows
    before = [p.detach().clone() for p in padded.model.parameters()]
    for trainer in (padded, packed):
        trainer.train()
    for key in ("loss", "reward_margin", "poft_weight", "policy_score"):
        assert logged(packed, key) == pytest.approx(logged(padded, key), rel=1e-5, abs=1e-6), key
    assert max((p - q).abs().max() for p, q in zip(padded.model.parameters(), before)) > 1e-2
    assert_same_parameters(padded, packed)
    # evaluation packs the same way (`eval_packing` follows `packing`) and gives the same mean over sequences
    assert packed.evaluate(scored_dataset)["eval_loss"] == pytest.approx(
        padded.evaluate(scored_dataset)["eval_loss"], rel=1e-5
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(packing=True, packing_strategy="wrapped"), "packing_strategy='wrapped'` cuts sequences"),
        (dict(packing=True, packing_strategy="bfd_split"), "packing_strategy='bfd_split'` cuts sequences"),
        (dict(eval_packing=True, packing_strategy="wrapped"), "packing_strategy='wrapped'` cuts sequences"),
        (dict(eval_packing=True), "`eval_packing=True` with `packing=False`.*lose their sequence boundaries"),
    ],
    ids=["wrapped", "bfd_split", "eval-wrapped", "eval-only"],
)
def test_packing_that_cuts_sequences_is_refused(tiny_model_dir, tmp_path, scored_dataset, overrides, match):
    with pytest.raises(ValueError, match=f"{match}.*PoFTTrainer needs each sequence whole"):
        make_trainer(tiny_model_dir, tmp_path, scored_dataset, max_length=128, **overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"beta": 0.0}, "`beta` must be > 0"),
        ({"gamma": math.nan}, "`gamma` must be a finite number"),
        ({"poft_target_scope": "prompt"}, "poft_target_scope='prompt'"),
        ({"loss_type": "dft"}, "cannot be combined with PoFTConfig"),
    ],
)
def test_bad_config_values_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        PoFTConfig(output_dir=str(tmp_path), **{**CPU_ARGS, **overrides})


def test_config_defaults(tmp_path):
    config = PoFTConfig(output_dir=str(tmp_path), **CPU_ARGS)
    assert (config.beta, config.gamma, config.poft_target_scope) == (1.0, 0.0, "completion")
    assert config.assistant_only_loss is None and config.loss_type == "nll"
    assert isinstance(config, FusedSFTConfig)
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(PoFTConfig)}
    for name in ("beta", "gamma", "poft_target_scope"):
        assert fields[name].metadata["help"] and f"{name} (`" in PoFTConfig.__doc__


# ------------------------------------------------------------------------------------------------ docs and DDP


def test_the_worked_example_of_the_docs_runs(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "methods", "poft.md")).read()
    code = text.split("## Worked example")[1].split("```python")[1].split("```")[0]
    namespace = {}
    exec(compile(code, "poft.md", "exec"), namespace)
    history = [log for log in namespace["trainer"].state.log_history if "loss" in log]
    assert len(history) == 5 and all(math.isfinite(log["loss"]) for log in history)
    assert history[-1]["reward_margin"] > history[0]["reward_margin"]
    assert os.listdir(tmp_path / "datasets-cache" / "hf_plugins" / "aligned_scores")  # the scores were cached


DDP_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hf_plugins import PoFTConfig, PoFTTrainer, score_with_aligned_models
    from hf_plugins.testing import CPU_TRAINING_ARGS, tiny_conversational_dataset

    model_dir, aligned, cache, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
    batch = int(sys.argv[5])
    dataset = score_with_aligned_models(tiny_conversational_dataset(32), aligned, cache_dir=cache)
    args = PoFTConfig(output_dir=out, max_steps=3, per_device_train_batch_size=batch, gradient_accumulation_steps=2,
                      learning_rate=5e-2, beta=2.0, **CPU_TRAINING_ARGS)
    trainer = PoFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    rank = trainer.accelerator.process_index
    logs = [[h["loss"], h["reward_margin"], h["poft_weight"]] for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(out, f"logs-{rank}.json"), "w") as handle:
        json.dump({"world": trainer.accelerator.num_processes, "logs": logs, "scores": list(dataset["ref_score"])},
                  handle)
""")


@pytest.mark.slow
def test_ddp_scores_and_trains_like_one_process(tiny_model_dir, tmp_path, aligned_pair):
    """2 CPU processes x batch 2 == 1 process x batch 4: every process ends with the same scores (the main process
    scores, the other reads its cache), and the loss is the mean over the sequences of both processes."""
    aligned = ",".join(save_pair(aligned_pair, tmp_path))
    script = tmp_path / "train_poft.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for name, launcher, batch in (("ddp", TORCHRUN, 2), ("single", [sys.executable], 4)):
        out = tmp_path / name
        out.mkdir()
        run_script([*launcher, script, tiny_model_dir, aligned, tmp_path / f"cache-{name}", out, batch])
        results[name] = [json.loads(path.read_text()) for path in sorted(out.glob("logs-*.json"))]
    ddp, (single,) = results["ddp"], results["single"]
    assert [r["world"] for r in ddp] == [2, 2] and single["world"] == 1
    assert ddp[0]["scores"] == ddp[1]["scores"] == pytest.approx(single["scores"], abs=1e-12)
    flat = [value for step in ddp[0]["logs"] for value in step]
    assert flat == pytest.approx([value for step in single["logs"] for value in step], rel=1e-5, abs=1e-6)
