"""ASFT (Anchored SFT, arXiv 2509.23753): DFT plus a full-vocabulary KL anchor to a frozen reference model.

Per supervised token, with `p = softmax(z)` the policy, `q = softmax(z_ref)` the reference and `w = sg(p(y))`:

    l_t = -w * log p(y) + kl_coef * KL(q || p),        KL(q || p) = sum_v q_v * (log q_v - log p_v)

As a target-weight rule this is `w * one_hot(y) + kl_coef * q`: the cross-entropy against that target equals the loss
up to `kl_coef * sum_v q_v log q_v` per token (the reference's negative entropy, constant in the policy). The fused
head reports the exact value, not only the exact gradient: the method hands it the per-row loss computed from the KL
(`Targets.loss`).

Where the reference has no next-token distribution (`ref_mask` False: the first token, which a prompt-tuned policy
predicts from its virtual tokens while a reference without them predicts nothing there), the token's loss is DFT's
term alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch

from ..ops.chunked import transform_logits_
from ..ops.method import PLAIN_LOGITS, Chunk, KernelSpec, KernelStats, LogitTransform, LossMethod, Rows, Targets
from ._common import compute_dtype, label_log_probs, reduce_sum


def check_kl_coef(kl_coef) -> float:
    """Return `kl_coef` as a float, raising a `ValueError` unless it is a finite number >= 0."""
    if isinstance(kl_coef, torch.Tensor) and kl_coef.numel() == 1:
        kl_coef = kl_coef.item()
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, Real):
        raise ValueError(f"`kl_coef` must be a number >= 0, got {kl_coef!r}.")
    kl_coef = float(kl_coef)
    if not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(
            f"`kl_coef` must be a finite number >= 0 (0 gives DFT; the paper's values are 0.03-0.1), got {kl_coef}."
        )
    return kl_coef


def asft_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    kl_coef: float = 0.05,
    num_items_in_batch=None,
    ref_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DFT's probability-weighted NLL plus `kl_coef * KL(softmax(ref_logits) || softmax(logits))` at every supervised
    token, reduced like `sft_loss`. Computed in float32 at least.

    Args:
        logits (`torch.Tensor` of shape `[B, T, V]`): the policy's logits, aligned with `labels`.
        ref_logits (`torch.Tensor` of shape `[B, T, V]`): the frozen reference model's logits at the same positions.
            They get no gradient.
        labels (`torch.LongTensor` of shape `[B, T]`): token ids, -100 where no loss is taken.
        kl_coef (`float`): weight of the KL anchor, >= 0; 0 gives exactly `dft_loss`.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this count; default: the
            mean over supervised tokens.
        ref_mask (`torch.BoolTensor` of shape `[B, T]`, *optional*): False where the reference has no prediction
            (its `ref_logits` there are ignored): those tokens get no KL term. Default: every position has one.
    """
    kl_coef = check_kl_coef(kl_coef)
    if not isinstance(ref_logits, torch.Tensor) or tuple(ref_logits.shape) != tuple(logits.shape):
        shape = tuple(ref_logits.shape) if isinstance(ref_logits, torch.Tensor) else type(ref_logits).__name__
        raise ValueError(
            f"`ref_logits` has shape {shape} but `logits` has shape {tuple(logits.shape)}: the reference must score "
            "the same positions over the same vocabulary."
        )
    label_logp, mask = label_log_probs(logits, labels)
    per_token = -label_logp.detach().exp() * label_logp
    if kl_coef:
        dtype = compute_dtype(torch.promote_types(logits.dtype, ref_logits.dtype))
        log_p = torch.log_softmax(logits.to(dtype), dim=-1)
        log_q = torch.log_softmax(ref_logits.detach().to(dtype), dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        anchored = mask if ref_mask is None else mask & _checked_ref_mask(ref_mask, labels).to(mask.device)
        per_token = per_token + kl_coef * kl.masked_fill(~anchored, 0.0)
    return reduce_sum(per_token.sum(), mask.sum(), num_items_in_batch)


def _checked_ref_mask(ref_mask, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(ref_mask, torch.Tensor) or tuple(ref_mask.shape) != tuple(labels.shape):
        shape = tuple(ref_mask.shape) if isinstance(ref_mask, torch.Tensor) else type(ref_mask).__name__
        raise ValueError(
            f"`ref_mask` has shape {shape}; it must be shaped like `labels` {tuple(labels.shape)}: whether the "
            "reference has a prediction at each label position."
        )
    return ref_mask.bool()


@dataclass
class ReferenceHead:
    """The reference lm_head of one call (detached), a per-call value of `ASFTMethod.prepare`'s result. `targets`
    reads it in the tile's compute dtype, cast on first use and kept for the call's other tiles; the triton kernel
    reads it as it is."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    #: what the reference model does to its logits (soft-cap, scale)
    transform: LogitTransform = PLAIN_LOGITS
    _cast: tuple | None = field(default=None, repr=False)

    def in_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._cast is None or self._cast[0].dtype != dtype:
            bias = self.bias.to(dtype) if self.bias is not None else None
            self._cast = (self.weight.to(dtype), bias)
        return self._cast


@dataclass
class ASFTTargets(Targets):
    """ASFT's targets, carrying the chunk's per-row `KL(ref || policy)` for the metrics (also when `kl_coef=0`)."""

    kl: torch.Tensor | None = None


class ASFTMethod(LossMethod):
    """Target rule of ASFT for the fused head.

    Inputs: `ref_hidden` (`[B, T, D_ref]` shaped like the hidden states, or `[N, D_ref]`), `ref_weight` (`[V, D_ref]`,
    the reference lm_head), `ref_bias` (`[V]`, *optional*), `kl_coef` and `ref_mask` (*optional*, shaped like the
    labels: False where the reference has no prediction, which gets no KL term; the fused head passes it when the
    policy's forward prepends virtual tokens) and `ref_logit_transform` (*optional*, a `LogitTransform`: the
    reference model's soft-cap and scale, `hf_plugins.modeling.logit_transform(ref_model)`). The reference logits are
    computed one chunk of rows at a time, in the head's compute dtype, and never get a gradient. `prepare` returns the
    per-row `ref_hidden` (and `kl_weight`) with the call's `kl_coef` and `ReferenceHead`.
    """

    name = "asft"

    def prepare(
        self,
        rows: Rows,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        kl_coef: float = 0.05,
        ref_mask: torch.Tensor | None = None,
        ref_logit_transform: LogitTransform | None = None,
    ) -> dict[str, Any]:
        kl_coef = check_kl_coef(kl_coef)
        if ref_logit_transform is not None and not isinstance(ref_logit_transform, LogitTransform):
            kind = type(ref_logit_transform).__name__
            raise ValueError(f"`ref_logit_transform` must be a `LogitTransform` (or None), got {kind}.")
        if not isinstance(ref_hidden, torch.Tensor) or not isinstance(ref_weight, torch.Tensor):
            raise ValueError(
                "Method 'asft' needs `ref_hidden` (the reference model's hidden states, shaped like `hidden`) and "
                "`ref_weight` (the reference lm_head weight [V, D_ref])."
            )
        if ref_weight.dim() != 2 or (rows.vocab_size is not None and ref_weight.shape[0] != rows.vocab_size):
            raise ValueError(
                f"`ref_weight` has shape {tuple(ref_weight.shape)}: it must be [V, D_ref] with V = {rows.vocab_size}, "
                "the policy's vocabulary size (the KL is taken over a shared vocabulary)."
            )
        if ref_bias is not None and tuple(ref_bias.shape) != (ref_weight.shape[0],):
            raise ValueError(
                f"`ref_bias` has shape {tuple(ref_bias.shape)}; it must be [V] = [{ref_weight.shape[0]}]."
            )
        positions = tuple(rows.mask.shape)
        expected = (*positions, ref_weight.shape[1])
        if tuple(ref_hidden.shape) != expected:
            raise ValueError(
                f"`ref_hidden` has shape {tuple(ref_hidden.shape)}; it must be {expected}: one reference hidden state "
                "per label position, as wide as `ref_weight`."
            )
        device = rows.labels.device
        # Detached: the reference side is a constant of the loss (it must get no gradient on any backend)
        reference = ReferenceHead(
            ref_weight.detach().to(device),
            ref_bias.detach().to(device) if ref_bias is not None else None,
            PLAIN_LOGITS if ref_logit_transform is None else ref_logit_transform,
        )
        row_inputs = {
            "ref_hidden": ref_hidden.detach().to(device)[rows.mask.to(device)],
            "reference": reference,
            "kl_coef": kl_coef,
        }
        if ref_mask is not None:
            anchored = rows.gather("ref_mask", _checked_ref_mask(ref_mask, rows.mask))
            # A per-row factor of kl_coef: 1 where the reference predicts, 0 where it has nothing to anchor to
            row_inputs["kl_weight"] = anchored.float()
        return row_inputs

    def targets(self, chunk: Chunk) -> ASFTTargets:
        dtype = chunk.log_probs.dtype
        kl_coef = chunk.inputs["kl_coef"]
        # cast once per call rather than once per chunk
        weight, bias = chunk.inputs["reference"].in_dtype(dtype)
        ref_hidden = chunk.inputs["ref_hidden"].to(dtype)
        # The reference's logits, log-probs and probabilities in two of the backend's reusable tiles, as the chunked
        # backend does for the policy: the logits tile becomes the probabilities, the other one the log-probs
        ref_probs, ref_log_probs = chunk.tile(0), chunk.tile(1)
        if bias is not None:
            torch.addmm(bias, ref_hidden, weight.t(), out=ref_probs)
        else:
            torch.mm(ref_hidden, weight.t(), out=ref_probs)
        transform_logits_(ref_probs, chunk.inputs["reference"].transform)
        torch.ops.aten._log_softmax.out(ref_probs, -1, False, out=ref_log_probs)
        torch.exp(ref_log_probs, out=ref_probs)
        # KL as sum q * (log q - log p) rather than a difference of two sums: exactly 0 when the policy still equals
        # the reference, and no cancellation when it is small. Built in place in the log-probs tile (no product tile)
        kl = ref_log_probs.sub_(chunk.log_probs).mul_(ref_probs).sum(-1)
        kl_weight = chunk.inputs.get("kl_weight")
        if kl_weight is not None:
            kl_weight = kl_weight.to(dtype)
            kl = kl * kl_weight
        dft_weight = chunk.label_log_probs.exp()
        targets = ASFTTargets(index=chunk.labels.unsqueeze(-1), value=dft_weight.unsqueeze(-1), kl=kl)
        # The loss from the KL just computed: the cross-entropy against the targets below would need two more passes
        # over the tile (its dense part, and the reference's negative entropy to add back)
        loss = -dft_weight * chunk.label_log_probs
        if kl_coef and kl_weight is None:  # kl_coef = 0 is exactly DFT: no dense target
            targets.dense = ref_probs.mul_(kl_coef)
            loss = loss + kl_coef * kl
        elif kl_coef:
            targets.dense = ref_probs.mul_((kl_coef * kl_weight).unsqueeze(-1))
            loss = loss + kl_coef * kl  # `kl` carries the per-row factor already
        targets.loss = loss
        return targets

    def metrics(self, chunk: Chunk, targets: ASFTTargets) -> dict[str, torch.Tensor]:
        return {"kl": targets.kl, "dft_weight": targets.value.squeeze(-1)}

    def kernel_spec(self, row_inputs) -> KernelSpec:
        # The reference tile is computed also at kl_coef = 0: the KL is reported either way
        head = row_inputs["reference"]
        reference = (row_inputs["ref_hidden"], head.weight, head.bias)
        weights = row_inputs.get("kl_weight")
        return KernelSpec(
            dft=True, reference=reference, kl_coef=row_inputs["kl_coef"], reference_weight=weights,
            reference_transform=head.transform,
        )  # fmt: skip

    def kernel_metrics(self, stats: KernelStats, row_inputs) -> dict[str, torch.Tensor]:
        kl = stats.aux if "kl_weight" not in row_inputs else stats.aux * row_inputs["kl_weight"].to(stats.aux.dtype)
        return {"kl": kl, "dft_weight": stats.label_log_probs.exp()}
