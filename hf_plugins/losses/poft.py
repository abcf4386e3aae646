"""PoFT (Preference-oriented SFT, arXiv 2412.12865): a Bradley-Terry objective between the policy and fixed aligned
models, on the same SFT data.

For a sequence `i` with `T_i` supervised tokens, the policy's score is its mean per-token log-prob of the response,
`r_i = (1 / T_i) sum_t log p(y_t)`, and `ref_i` is the aligned models' mean score of the same response (computed
offline, each aligned model in its own tokenisation: `hf_plugins.score_with_aligned_models`). The loss is

    L_i = -log sigmoid(beta * (r_i - ref_i) + gamma) = softplus(-(beta * (r_i - ref_i) + gamma))

reduced as a mean over sequences (`sum_i L_i / num_items_in_batch` when the count of sequences is given). Because
`ref_i` is a constant, the gradient is length-normalised SFT with a per-sequence weight in (0, beta):

    dL_i / dz_t = c_i * (softmax(z_t) - one_hot(y_t)),      c_i = beta * sigmoid(beta * (ref_i - r_i) - gamma) / T_i

so as a target-weight rule it is `w = c_i * one_hot(y_t)` with `c_i` detached. `c_i` needs the whole sequence's
`r_i`, which a chunk of rows does not hold: the fused method runs a no-grad pass of the head first
(`Rows.label_log_probs`, one extra `[rows, V]` matmul per tile and no backward), then the usual single pass that
computes the loss and the gradients together. A per-row constant (`Targets.constant`) makes the reported value the
exact PoFT loss, not only its gradient.

Limits: `ref_i -> +inf` makes the weight `beta / T_i`, i.e. `beta` times per-sequence-mean SFT (the loss is then
that SFT loss plus the constant `beta * ref_i - gamma`); `ref_i -> -inf` (or `r_i >> ref_i`) makes the loss and the
gradient vanish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

from ..ops.method import Chunk, KernelSpec, KernelStats, LossMethod, Rows, Targets
from ._common import label_log_probs, reduce_sum, sequence_ids


#: Where the aligned models' scores come from, named in every error about missing or invalid scores
SCORER = "hf_plugins.score_with_aligned_models"


def check_beta_gamma(beta, gamma) -> tuple[float, float]:
    """`(beta, gamma)` as floats, raising a `ValueError` unless beta is a finite number > 0 and gamma is finite."""
    values = []
    for name, value in (("beta", beta), ("gamma", gamma)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        values.append(float(value))
    if values[0] <= 0:
        raise ValueError(
            f"`beta` must be > 0 (the scale of the score difference inside the sigmoid; the paper's value is 1.0), "
            f"got {values[0]}."
        )
    return values[0], values[1]


def check_ref_scores(ref_scores, num_sequences: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`ref_scores` as a `[num_sequences]` tensor, raising a `ValueError` for a wrong length or NaN/inf values."""
    if ref_scores is None:
        raise ValueError(
            f"PoFT needs `ref_scores`, the aligned models' mean per-token log-prob of each response (one per "
            f"sequence): compute them once with `{SCORER}`."
        )
    try:
        scores = torch.as_tensor(ref_scores)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"`ref_scores` must be a tensor of numbers, one per sequence: {error}") from None
    if scores.dim() != 1 or scores.shape[0] != num_sequences:
        raise ValueError(
            f"`ref_scores` has shape {tuple(scores.shape)} but the batch holds {num_sequences} sequences: pass one "
            "score per sequence (per row of `labels`, or per sequence found in `position_ids` when packed)."
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"`ref_scores` must hold real numbers (log-probs), got dtype {scores.dtype}.")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(
            f"`ref_scores` holds {bad} NaN or infinite value(s): every sequence needs a finite aligned-model score. "
            f"Drop the examples `{SCORER}` could not score (their response was empty), e.g. "
            "`dataset.filter(lambda row: math.isfinite(row['ref_score']))`."
        )
    return scores.detach().to(device=device, dtype=dtype)


def sequence_coefficients(sums, counts, ref_scores, beta: float, gamma: float):
    """Per-sequence `(r, loss, c)`: the policy score `sum / count`, `softplus(-(beta (r - ref) + gamma))` and the
    token weight `beta * sigmoid(beta (ref - r) - gamma) / count`. Sequences without tokens get 0 everywhere."""
    trained = counts > 0
    safe_counts = counts.clamp(min=1).to(sums.dtype)
    r = torch.where(trained, sums / safe_counts, torch.zeros_like(sums))
    margin = beta * (r - ref_scores) + gamma
    loss = torch.where(trained, F.softplus(-margin), torch.zeros_like(margin))
    weight = torch.sigmoid(-margin)
    coefficient = torch.where(trained, beta * weight / safe_counts, torch.zeros_like(weight))
    return r, loss, coefficient, weight


def poft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_scores: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 0.0,
    num_items_in_batch=None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mean_i -log sigmoid(beta * (r_i - ref_i) + gamma)` over the sequences with at least one supervised token,
    `r_i` the mean log-prob of sequence i's supervised tokens. Computed in float32 at least.

    Args:
        logits (`torch.Tensor` of shape `[B, T, V]`): the policy's logits, aligned with `labels`.
        labels (`torch.LongTensor` of shape `[B, T]`): token ids, -100 where no loss is taken (the prompt).
        ref_scores (`torch.Tensor` of shape `[B]`): the aligned models' mean per-token log-prob of each sequence's
            response (`hf_plugins.score_with_aligned_models`); with `position_ids`, one per packed sequence.
        beta (`float`): scale of the score difference, > 0 (1.0 in the paper and the official code).
        gamma (`float`): margin added inside the sigmoid (0.0 in the official code).
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed per-sequence losses by this
            count of sequences (the global count under gradient accumulation and DDP); default: the mean over the
            sequences that have a supervised token. A sequence without one adds no loss and is not counted.
        position_ids (`torch.LongTensor` of shape `[B, T]`, *optional*): for packed rows, each label's token
            position within its own sequence (aligned with `labels`); sequences start where it does not increase by
            one. Without it each row is one sequence.
    """
    beta, gamma = check_beta_gamma(beta, gamma)
    logp, mask = label_log_probs(logits, labels)
    ids, num_sequences = sequence_ids(labels, position_ids)
    scores = check_ref_scores(ref_scores, num_sequences, logp.device, logp.dtype)
    flat_ids = ids.reshape(-1)
    sums = torch.zeros(num_sequences, dtype=logp.dtype, device=logp.device).index_add(0, flat_ids, logp.reshape(-1))
    counts = torch.zeros(num_sequences, dtype=torch.long, device=logp.device).index_add(
        0, flat_ids, mask.reshape(-1).long()
    )
    _, per_sequence, _, _ = sequence_coefficients(sums, counts, scores, beta, gamma)
    return reduce_sum(per_sequence.sum(), int((counts > 0).sum()), num_items_in_batch)


#: PoFT's per-sequence metrics: means over the trained sequences, not over tokens (`PoFTMethod.metric_counts`)
SEQUENCE_METRICS = ("reward_margin", "poft_weight", "policy_score")


@dataclass
class PoFTTargets(Targets):
    """PoFT's targets, carrying the per-row metric values of the tile's sequences."""

    row_metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SequenceScores:
    """The per-sequence values of one call, a per-call value of `PoFTMethod.prepare`'s result: the aligned models'
    scores (`[S]`, float64), each sequence's number of supervised rows (`[S]`) and the number of sequences that have
    one (0-d: a tensor, read on the host only where it divides the loss, without `num_items_in_batch`)."""

    ref_scores: torch.Tensor
    counts: torch.Tensor
    num_trained: torch.Tensor


def sequence_metric_rows(r, ref_scores, weight, row_sequence, row_count) -> dict[str, torch.Tensor]:
    """The per-sequence metrics spread over the rows: each row of sequence i carries `value_i / T_i`, so the rows of
    a sequence sum to its value and the head's sum over rows, divided by the number of trained sequences, is the
    mean over sequences."""
    values = {"reward_margin": r - ref_scores, "poft_weight": weight, "policy_score": r}
    return {name: values[name][row_sequence] / row_count for name in SEQUENCE_METRICS}


class PoFTMethod(LossMethod):
    """Target rule of PoFT for the fused head: `w = c_i * one_hot(y)` with the detached per-sequence weight
    `c_i = beta * sigmoid(beta * (ref_i - r_i) - gamma) / T_i`, plus a per-row constant so that the value is the exact
    PoFT loss.

    Inputs: `ref_scores` (`[S]`, one per sequence), `beta`, `gamma` and, for packed rows, `position_ids` (shaped like
    `labels`, aligned with them). A sequence's weight needs its whole `r_i` before its gradient: on backends that keep
    sequences whole within a tile (`chunked`, `reference`: `tile_groups`) each tile scores its own sequences first,
    so the head costs SFT's three matmuls (a sequence longer than the tile gets a tile of its own); on `triton`, whose
    kernel needs every weight up front, `prepare` runs a no-grad pass of the head (`Rows.label_log_probs`) first.
    Without `num_items_in_batch` the loss is the mean over the sequences that have a supervised token.

    Metrics (besides the head's per-token ones): `nll`, the plain mean NLL per supervised token; and per-sequence
    means over the trained sequences (`metric_counts`) `reward_margin` (`r_i - ref_i`), `poft_weight`
    (`sigmoid(beta (ref_i - r_i) - gamma)`, in (0, 1)) and `policy_score` (`r_i`): each row carries its sequence's
    value divided by `T_i`, and the head divides their sum by the number of trained sequences.
    """

    name = "poft"

    def prepare(
        self,
        rows: Rows,
        ref_scores: torch.Tensor | None = None,
        beta: float = 1.0,
        gamma: float = 0.0,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        beta, gamma = check_beta_gamma(beta, gamma)
        if position_ids is None:
            row_sequence, num_sequences = rows.sequence_index, rows.num_sequences
        else:
            ids, num_sequences = sequence_ids(rows.mask, position_ids)
            row_sequence = ids.to(rows.mask.device)[rows.mask]
        device = rows.labels.device
        row_sequence = row_sequence.to(device)
        counts = torch.zeros(num_sequences, dtype=torch.long, device=device).index_add(
            0, row_sequence, torch.ones_like(row_sequence)
        )
        # the scores are kept in float64 and cast to each tile's compute dtype
        scores = check_ref_scores(ref_scores, num_sequences, device, torch.float64)
        call = {"beta": beta, "gamma": gamma, "sequences": SequenceScores(scores, counts, (counts > 0).sum())}

        if rows.whole_sequence_tiles:
            # Every tile holds whole sequences (`tile_groups`): each tile scores its own sequences before forming its
            # gradient, so the head makes three matmuls, with no first pass
            return {**call, "row_sequence": row_sequence}

        log_probs = rows.label_log_probs()
        dtype = log_probs.dtype
        scores = scores.to(dtype)
        sums = torch.zeros(num_sequences, dtype=dtype, device=device).index_add(0, row_sequence, log_probs)
        r, loss, coefficient, weight = sequence_coefficients(sums, counts, scores, beta, gamma)
        count = counts.to(dtype).clamp(min=1)[row_sequence]
        row_coefficient = coefficient[row_sequence]
        # sum_t (-c_i log p_t + k_t) over sequence i must be L_i: k_t = L_i / T_i + c_i * r_i
        constant = loss[row_sequence] / count + row_coefficient * r[row_sequence]
        return {
            **call,
            "label_weight": row_coefficient,
            "constant": constant,
            **sequence_metric_rows(r, scores, weight, row_sequence, count),
        }

    def tile_groups(self, row_inputs: dict[str, Any]) -> torch.Tensor | None:
        return row_inputs.get("row_sequence")

    def num_items(self, rows: Rows, row_inputs: dict[str, Any]) -> torch.Tensor:
        return row_inputs["sequences"].num_trained

    def metric_counts(self, rows: Rows, row_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return dict.fromkeys(SEQUENCE_METRICS, row_inputs["sequences"].num_trained)

    def targets(self, chunk: Chunk) -> Targets:
        dtype = chunk.log_probs.dtype
        inputs = chunk.inputs
        if "label_weight" in inputs:  # the weights of a first pass (`prepare`)
            weight, constant = inputs["label_weight"].to(dtype).unsqueeze(-1), inputs["constant"].to(dtype)
            targets = PoFTTargets(index=chunk.labels.unsqueeze(-1), value=weight, constant=constant)
            targets.row_metrics = {name: inputs[name] for name in SEQUENCE_METRICS}
            return targets
        # Whole sequences in this tile: score them from the tile's own log-probs
        scores, counts = inputs["sequences"].ref_scores, inputs["sequences"].counts
        sequence = inputs["row_sequence"]
        local, inverse = torch.unique_consecutive(sequence, return_inverse=True)
        sums = torch.zeros(local.numel(), dtype=dtype, device=sequence.device)
        sums = sums.index_add(0, inverse, chunk.label_log_probs)
        seen = torch.zeros_like(local).index_add(0, inverse, torch.ones_like(inverse))
        if not torch.equal(seen, counts[local]):
            raise RuntimeError("PoFT: a tile split a sequence; the backend must honour `tile_groups`.")
        local_scores = scores[local].to(dtype)
        r, loss, coefficient, weight = sequence_coefficients(
            sums, counts[local], local_scores, inputs["beta"], inputs["gamma"]
        )
        count = counts[local].to(dtype).clamp(min=1)[inverse]
        row_coefficient = coefficient[inverse]
        targets = PoFTTargets(index=chunk.labels.unsqueeze(-1), value=row_coefficient.unsqueeze(-1))
        targets.constant = loss[inverse] / count + row_coefficient * r[inverse]
        targets.row_metrics = sequence_metric_rows(r, local_scores, weight, inverse, count)
        return targets

    def metrics(self, chunk: Chunk, targets: PoFTTargets) -> dict[str, torch.Tensor]:
        return {"nll": -chunk.label_log_probs, **targets.row_metrics}

    def kernel_spec(self, row_inputs) -> KernelSpec:
        return KernelSpec(label_weight=row_inputs["label_weight"], constant=row_inputs["constant"])

    def kernel_metrics(self, stats: KernelStats, row_inputs) -> dict[str, torch.Tensor]:
        return {"nll": -stats.label_log_probs, **{name: row_inputs[name] for name in SEQUENCE_METRICS}}
