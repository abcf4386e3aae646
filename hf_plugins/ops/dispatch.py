"""`fused_linear_loss`: the one loss-head primitive every trainer in this library calls."""

from __future__ import annotations

import torch

from ..utils import is_integer, triton_usable
from .chunked import chunked_label_log_probs, chunked_linear_loss, default_chunk_size
from .method import IGNORE_INDEX, PLAIN_LOGITS, LogitTransform, LossMethod, Rows
from .reference import reference_linear_loss


BACKENDS = ("auto", "chunked", "reference", "triton", "liger")


def resolve_backend(backend: str, device: torch.device, method: LossMethod | None = None) -> str:
    """The backend that `backend` names on `device` for `method`.

    "auto" is the fastest available: our Triton kernels on CUDA for every method that has a kernel form (measured
    faster than Liger's on every method both cover: docs/benchmarks.md), else "chunked" (on CPU always).
    """
    from .liger import LIGER_METHODS, liger_available

    if backend not in BACKENDS:
        raise ValueError(f"Unknown loss backend {backend!r}: choose one of {', '.join(map(repr, BACKENDS))}.")
    if backend == "auto":
        # "auto" stays undecided on CUDA until the method's inputs show whether it has a kernel form
        return "auto" if device.type == "cuda" and triton_usable(device) else "chunked"
    if backend in ("triton", "liger") and not (triton_usable(device) and (backend == "triton" or liger_available())):
        raise ValueError(
            f"loss backend {backend!r} needs a CUDA device with triton"
            + (" and liger-kernel installed" if backend == "liger" else "")
            + f" (got a {device.type} tensor; tests run it on CPU under TRITON_INTERPRET=1): use 'chunked' here."
        )
    if backend == "liger" and method is not None and method.name not in LIGER_METHODS:
        raise ValueError(
            f"loss backend 'liger' covers the methods {', '.join(LIGER_METHODS)}, not {method.name!r}: use 'triton' "
            "or 'chunked'."
        )
    return backend


def resolve_method(method: str | LossMethod) -> LossMethod:
    from ..losses import METHODS

    if isinstance(method, LossMethod):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(
        f"Unknown loss method {method!r}: choose one of {', '.join(map(repr, METHODS))} or pass a `LossMethod`."
    )


def _flatten(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None):
    if hidden.dim() not in (2, 3) or tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"`hidden` {tuple(hidden.shape)} and `labels` {tuple(labels.shape)} do not match: pass hidden [B, T, D] "
            "with labels [B, T], or hidden [N, D] with labels [N]."
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"`weight` has shape {tuple(weight.shape)} but `hidden` has dimension {hidden.shape[-1]}: the lm_head "
            "weight must be [V, D] with D the hidden size."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"`bias` has shape {tuple(bias.shape)}; it must be [V] = [{weight.shape[0]}].")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"`labels` must hold integer token ids, got dtype {labels.dtype}.")
    mask = labels != IGNORE_INDEX
    row_labels = labels[mask].long()
    if row_labels.numel():
        low, high = int(row_labels.min()), int(row_labels.max())
        if low < 0 or high >= weight.shape[0]:
            bad = low if low < 0 else high
            raise ValueError(
                f"`labels` holds {bad}, outside the vocabulary [0, {weight.shape[0]}): labels must be token ids or "
                "-100 (ignored). Check the tokenizer matches the model's lm_head."
            )
    if labels.dim() == 2:
        sequence_index = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
        num_sequences = labels.shape[0]
    else:
        sequence_index = torch.zeros_like(row_labels)
        num_sequences = 1
    return hidden[mask], row_labels, mask, sequence_index, num_sequences


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    method: str | LossMethod = "sft",
    *,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_metrics: bool = False,
    logit_transform: LogitTransform | None = None,
    **method_inputs,
):
    """A method's loss over `hidden @ weight.T (+ bias)` without materialising the logits.

    Equal in value and gradient to the functional loss of `method` in `hf_plugins.losses` applied to the logits.

    Args:
        hidden (`torch.Tensor` of shape `[B, T, D]` or `[N, D]`): hidden states, aligned with `labels`
            (`hidden[b, t]` predicts `labels[b, t]`: shift before calling).
        weight (`torch.Tensor` of shape `[V, D]`): the lm_head weight.
        labels (`torch.LongTensor` of shape `[B, T]` or `[N]`): token ids, -100 where no loss is taken.
        method (`str` or `LossMethod`): `"sft"`, `"dft"`, `"weighted"`, `"asft"`, `"otr"`, `"poft"`, `"grpo"` or a
            method object.
        bias (`torch.Tensor` of shape `[V]`, *optional*): the lm_head bias.
        backend (`str`): `"auto"` (fastest on the device: `"triton"` on CUDA, `"chunked"` elsewhere), `"chunked"`
            (pure torch, any device), `"triton"` (our Triton kernels, CUDA), `"liger"` (Liger-Kernel's fused linear
            cross-entropy, CUDA; sft, dft and weighted only) or `"reference"` (materialises the logits; for tests).
        chunk_size (`int`, *optional*): rows per tile; default: on `chunked`, a tile of about 4M logits, at least 128
            rows; on `triton`, at most max(N * D, 4M) logits, a power of two of rows.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this count; default:
            the mean over supervised tokens (`"poft"`: over sequences, see `LossMethod.num_items`). A method that
            builds its own reduction (`"grpo"`: `LossMethod.reduces_itself`) takes it as an input instead.
        return_metrics (`bool` or `"sums"`): also return a dict of metrics. `True`: means as floats: `label_prob`
            (mean p(label)), `token_accuracy` (argmax == label), `entropy`, plus the method's own (e.g.
            `dft_weight`; per-token means, or means over the count `LossMethod.metric_counts` gives, e.g. PoFT's
            per-sequence means), and `num_tokens`, the number of supervised tokens. `"sums"`: the same metrics left
            on the device, for callers that reduce them across processes and read them later (no host sync):
            `num_tokens` (an int), each token mean as its sum over the supervised tokens (a 0-d tensor), and each
            metric with its own count as a `(sum, count)` pair. Both add what the method reports for the whole call
            (`LossMethod.call_metrics`; `"grpo"`: TRL's statistics as a `GRPOStatistics` under `"grpo_statistics"`).
            They cost no extra pass.
        logit_transform (`LogitTransform`, *optional*): what the model does to `hidden @ weight.T + bias` before its
            softmax (`scale`, then the soft-cap `softcap * tanh(z / softcap)`); the loss and every target weight are
            those of the transformed logits, as the functional losses on the model's own logits. Default: none.
            `hf_plugins.modeling.logit_transform(model)` reads it from a model's config.
        **method_inputs: the method's inputs (e.g. `token_weights` [B, T] for `"weighted"`).

    Returns:
        The scalar loss (float32, float64 for float64 inputs), or `(loss, metrics)` with `return_metrics`.
    """
    method = resolve_method(method)
    backend = resolve_backend(backend, hidden.device, method)
    transform = PLAIN_LOGITS if logit_transform is None else logit_transform
    if not isinstance(transform, LogitTransform):
        raise ValueError(
            f"`logit_transform` must be a `LogitTransform` (or None), got {type(logit_transform).__name__}."
        )
    if chunk_size is not None and (not is_integer(chunk_size) or chunk_size <= 0):
        raise ValueError(f"`chunk_size` must be a positive integer number of rows, got {chunk_size!r}.")
    if return_metrics not in (False, True, "sums"):
        raise ValueError(f"`return_metrics` must be True, False or 'sums', got {return_metrics!r}.")
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, (int, float, torch.Tensor)):
        raise ValueError(f"`num_items_in_batch` must be a number or a tensor, got {type(num_items_in_batch)}.")

    if method.reduces_itself:  # the method's own input, not the head's divisor
        method_inputs["num_items_in_batch"] = num_items_in_batch
        num_items_in_batch = None

    row_hidden, row_labels, mask, sequence_index, num_sequences = _flatten(hidden, weight, labels, bias)
    chunk_size_arg = chunk_size  # the triton backend sizes its own tiles for the GPU
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    rows = Rows(
        labels=row_labels,
        mask=mask,
        sequence_index=sequence_index,
        num_sequences=num_sequences,
        label_log_probs=lambda: chunked_label_log_probs(
            row_hidden, weight, bias, row_labels, chunk_size, method.logit_scale, transform
        ),
        vocab_size=weight.shape[0],
        # chunked honours `LossMethod.tile_groups`; reference is one tile; triton needs every weight before its kernel,
        # unless the method forms them between the kernel's two launches (`KernelSpec.row_targets`)
        whole_sequence_tiles=backend in ("chunked", "reference")
        or (backend in ("triton", "auto") and method.whole_sequence_kernel_tiles),
    )
    try:
        row_inputs = method.prepare(rows, **method_inputs)
    except TypeError as error:  # an input the method's `prepare` does not take
        raise ValueError(f"Method '{method.name}' got an unexpected input: {error}") from error

    num_rows = row_labels.numel()
    if num_items_in_batch is None:
        denominator = float(max(method.num_items(rows, row_inputs), 1))
    else:
        denominator = float(max(float(num_items_in_batch), 1.0))

    spec = method.kernel_spec(row_inputs) if backend == "triton" or backend == "auto" else None
    if backend == "triton" and spec is None:
        raise ValueError(
            f"Method {method.name!r} has no Triton kernel form (`LossMethod.kernel_spec` returns None): use "
            "loss backend 'chunked' for it."
        )
    if backend == "auto":
        backend = "triton" if spec is not None else "chunked"

    metric_sums = {} if return_metrics else None
    if backend == "reference":
        loss = reference_linear_loss(
            row_hidden, weight, bias, row_labels, method, row_inputs, denominator, metric_sums, transform
        )
    elif backend == "triton":
        from .triton.head import triton_linear_loss

        loss = triton_linear_loss(
            row_hidden,
            weight,
            bias,
            row_labels,
            method,
            row_inputs,
            spec,
            chunk_size_arg,
            denominator,
            metric_sums,
            transform,
        )
    elif backend == "liger":
        from .liger import liger_linear_loss

        loss = liger_linear_loss(
            row_hidden, weight, bias, row_labels, method, row_inputs, denominator, metric_sums, transform
        )
    else:
        loss = chunked_linear_loss(
            row_hidden, weight, bias, row_labels, method, row_inputs, chunk_size, denominator, metric_sums, transform
        )
    if not return_metrics:
        return loss
    counts = method.metric_counts(rows, row_inputs)
    call_metrics = method.call_metrics(row_inputs)
    if return_metrics == "sums":
        sums = {name: (value, counts[name]) if name in counts else value for name, value in metric_sums.items()}
        return loss, {**sums, "num_tokens": num_rows, **call_metrics}
    metrics = {name: float(value) / max(float(counts.get(name, num_rows)), 1.0) for name, value in metric_sums.items()}
    metrics.update(call_metrics)
    metrics["num_tokens"] = num_rows
    return loss, metrics
