"""The `liger` backend: Liger-Kernel's fused linear cross-entropy for the methods it covers.

- `sft`: the summed cross-entropy (`reduction="sum"`), divided by our denominator.
- `dft`: the same with `use_token_scaling=True` (each token's loss scaled by its detached `p(y)`).
- `weighted`: the per-token losses (`reduction="none"`) times the token weights. Liger defers the gradient to
  backward for that reduction (one more matmul per tile); its gradients are right only from liger-kernel 0.8.2.

A model's logit transform: Liger's own `softcap` argument caps the logits; a scale is folded into the hidden states
and the bias (`softcap(s * (h @ W.T + b)) = softcap((s * h) @ W.T + s * b)`, an `[N, D]` product autograd carries
back). Label smoothing (`sft` with `label_smoothing`) is Liger's `label_smoothing`, the same target
`(1 - eps) * one_hot(y) + eps / V`.

Liger reports no label probability or entropy: with `return_metrics=True` this backend reports `token_accuracy`
(where the installed Liger returns it) and the number of tokens, nothing else.
"""

from __future__ import annotations

import inspect

import torch

from .method import PLAIN_LOGITS, LogitTransform, LossMethod


LIGER_METHODS = ("sft", "dft", "weighted")


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def liger_linear_loss(
    hidden, weight, bias, labels, method: LossMethod, row_inputs, denominator, metrics_out,
    transform: LogitTransform = PLAIN_LOGITS,
):  # fmt: skip
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if method.logit_scale != 1.0:
        raise ValueError(f"loss backend 'liger' has no logit scale for method {method.name!r}: use 'triton'.")
    if transform.scale != 1.0:
        hidden = hidden * transform.scale
        bias = bias * transform.scale if bias is not None else None
    kwargs = {"bias": bias, "reduction": "none" if method.name == "weighted" else "sum"}
    if transform.softcap is not None:
        kwargs["softcap"] = transform.softcap
    if method.name == "dft":
        kwargs["use_token_scaling"] = True
    smoothing = row_inputs.get("label_smoothing")
    if smoothing is not None and smoothing.numel():
        kwargs["label_smoothing"] = float(smoothing[0])
    want_accuracy = (
        metrics_out is not None
        and "return_token_accuracy" in inspect.signature(liger_fused_linear_cross_entropy).parameters
    )
    if want_accuracy:
        kwargs["return_token_accuracy"] = True
    if labels.numel() == 0:
        # Liger divides by the number of supervised tokens in places; an empty call is a zero loss
        loss = (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
        if metrics_out is not None and want_accuracy:
            metrics_out["token_accuracy"] = torch.zeros((), device=hidden.device)
        return loss
    out = liger_fused_linear_cross_entropy(hidden, weight, labels, **kwargs)
    loss = out.loss if want_accuracy else out
    if method.name == "weighted":
        loss = (loss * row_inputs["token_weights"].to(loss.dtype)).sum()
        if metrics_out is not None:
            metrics_out["token_weight"] = row_inputs["token_weights"].sum()
    if want_accuracy:
        # Liger returns per-token values with reduction="none" and their mean otherwise; the dispatcher wants sums
        accuracy = out.token_accuracy.detach()
        metrics_out["token_accuracy"] = accuracy.sum() if accuracy.dim() else accuracy * labels.numel()
    return loss / denominator


def apply_liger_model_patches(model) -> bool:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on `model`, the way transformers applies Liger to a loaded model
    (`_apply_liger_kernel_to_instance`), leaving the loss head alone: ours replaces it. Returns False when Liger has
    no patch for the architecture."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = getattr(model, "get_base_model", None)
    target = base() if callable(base) else model
    if getattr(getattr(target, "config", None), "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(
        model=target, rms_norm=True, rope=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True
