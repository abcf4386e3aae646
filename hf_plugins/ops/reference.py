"""The `reference` backend: materialises the logits of the supervised rows and lets autograd differentiate the
method's target rule. Slow and memory-hungry on purpose: it is the readable definition the other backends are tested
against, not a training path."""

from __future__ import annotations

import torch

from .chunked import chunk_compute_dtype
from .method import PLAIN_LOGITS, Chunk, LogitTransform, LossMethod


def reference_linear_loss(
    hidden, weight, bias, labels, method: LossMethod, row_inputs, denominator, metrics_out,
    transform: LogitTransform = PLAIN_LOGITS,
):  # fmt: skip
    dtype = chunk_compute_dtype(hidden, weight, bias)
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = transform(logits)
    if method.logit_scale != 1.0:
        logits = logits * method.logit_scale
    log_probs = torch.log_softmax(logits, dim=-1)
    detached = log_probs.detach()
    chunk = Chunk(
        log_probs=detached,
        probs=detached.exp(),
        labels=labels,
        label_log_probs=detached.gather(1, labels.unsqueeze(-1)).squeeze(-1),
        rows=slice(0, hidden.shape[0]),
        inputs=row_inputs,
    )
    targets = method.targets(chunk)
    loss = targets.row_loss(log_probs).sum() / denominator
    if metrics_out is not None:
        metrics_out["label_prob"] = chunk.label_log_probs.exp().sum()
        metrics_out["entropy"] = -(chunk.probs * detached).sum()
        metrics_out["token_accuracy"] = (detached.argmax(-1) == labels).to(dtype).sum()
        for name, per_row in method.metrics(chunk, targets).items():
            metrics_out[name] = per_row.to(dtype).sum()
    return loss
