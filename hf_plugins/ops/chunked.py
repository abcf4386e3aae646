"""The `chunked` backend: the fused linear loss head in pure torch, for CPU and any GPU.

Rows are processed `chunk_size` at a time, so at most two `[chunk_size, V]` tiles exist at once (the log-probs and
the probabilities, which then become the logits gradient in place), plus the spare tiles a method asks for
(`Chunk.tile`: one for OTR's sampler, two for ASFT's reference); each is allocated once per call. Because every
method's target weights are known in the forward pass, the gradients w.r.t. hidden, weight and bias are computed
there too and only scaled by the incoming gradient in backward: three matmuls per tile (logits, grad_hidden,
grad_weight), no recompute.

A model's logit transform (`LogitTransform`: a scale, then a soft-cap `c * tanh(z / c)`) is applied to each tile in
place; its Jacobian is diagonal, `scale * (1 - (z' / c)^2)`, so the logits gradient is multiplied by it elementwise,
from the log-probabilities tile (`z' = log p + logsumexp`): still two tiles and three matmuls.
"""

from __future__ import annotations

import torch

from .method import PLAIN_LOGITS, Chunk, LogitTransform, LossMethod, chunk_inputs
from .precomputed import precomputed_gradient_loss


#: Default tile budget in elements (16 MiB of float32 per buffer; the call keeps two). Measured on CPU
#: (docs/benchmarks.md, N=4096, V=32000, D=256, 1 thread) with the two buffers reused across tiles: 128-row tiles run
#: at 1.2x the bare three-matmul time against 1.35-1.4x at 64 rows, for about 105 MiB of peak extra memory.
DEFAULT_TILE_ELEMENTS = 1 << 22
#: Fewer rows than this starve the matmuls (the weight is re-read once per tile), whatever the vocabulary size.
MIN_CHUNK_ROWS = 128


def default_chunk_size(vocab_size: int) -> int:
    return max(MIN_CHUNK_ROWS, DEFAULT_TILE_ELEMENTS // max(vocab_size, 1))


def chunk_compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (tests), else float32 (bf16/fp16 inputs are upcast per tile)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def tile_slices(n_rows: int, chunk_size: int, groups: torch.Tensor | None = None) -> list[slice]:
    """Tiles of at most `chunk_size` rows; with `groups` (per-row ids, non-decreasing), tiles end only where a group
    ends, and a group longer than `chunk_size` is a tile of its own.

    There is always at least one (possibly empty) tile: a call without supervised rows still reports every metric
    name, so that processes gathering metrics under DDP always exchange the same keys.
    """
    if groups is None or n_rows == 0:
        return [slice(start, min(start + chunk_size, n_rows)) for start in range(0, max(n_rows, 1), chunk_size)]
    ends = ((groups[1:] != groups[:-1]).nonzero().flatten() + 1).tolist() + [n_rows]
    tiles, start, end = [], 0, 0
    for group_end in ends:
        if group_end - start > chunk_size and end > start:
            tiles.append(slice(start, end))
            start = end
        end = group_end
    tiles.append(slice(start, n_rows))
    return tiles


def transform_logits_(logits: torch.Tensor, transform: LogitTransform, post_scale: float = 1.0) -> torch.Tensor:
    """`post_scale * softcap(scale * logits)` in place (a method's `logit_scale` is the post-scale)."""
    if transform.softcap is None:
        factor = transform.scale * post_scale
        if factor != 1.0:
            logits.mul_(factor)
        return logits
    cap = transform.softcap
    return logits.mul_(transform.scale / cap).tanh_().mul_(cap * post_scale)


def run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    method: LossMethod,
    row_inputs: dict[str, torch.Tensor],
    chunk_size: int,
    grad_scale: float | None,
    want_metrics: bool,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    transform: LogitTransform = PLAIN_LOGITS,
):
    """One pass over the supervised rows of the logits `logit_scale * transform(hidden @ weight.T + bias)`.

    Returns `(loss_sum, grads, metric_sums)`: the summed per-row loss, `(grad_hidden, grad_weight, grad_bias)` of
    `grad_scale * loss_sum` (None when `grad_scale` is None or `needs_grad` says that input needs none: a frozen
    lm_head under LoRA skips the weight-gradient matmul), and per-metric sums.
    """
    dtype = chunk_compute_dtype(hidden, weight, bias)
    n_rows = hidden.shape[0]
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    want_grad = grad_scale is not None and any(needs_grad)
    need_hidden, need_weight, need_bias = (want_grad and flag for flag in needs_grad)
    logit_scale = method.logit_scale
    softcap = transform.softcap
    if want_grad:  # the loss is a function of logit_scale * softcap(scale * z): its z-gradient carries both factors
        grad_scale = grad_scale * logit_scale * transform.scale

    grad_hidden = torch.empty((n_rows, hidden.shape[1]), dtype=dtype, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros_like(w) if need_weight else None
    grad_bias = torch.zeros_like(b) if need_bias and b is not None else None

    loss_sum = torch.zeros((), dtype=dtype, device=hidden.device)
    metric_sums: dict[str, torch.Tensor] = {}

    def add_metric(name, per_row):
        metric_sums[name] = metric_sums.get(name, 0) + per_row.sum()

    tiles = tile_slices(n_rows, chunk_size, method.tile_groups(row_inputs))
    # Two tile buffers for the whole call, reused by every tile: a fresh [rows, V] allocation per tile costs page
    # faults that show in the timings (docs/benchmarks.md)
    tile_rows = max(tile.stop - tile.start for tile in tiles)
    log_prob_buffer = torch.empty((tile_rows, w.shape[0]), dtype=dtype, device=hidden.device)
    prob_buffer = torch.empty_like(log_prob_buffer)
    # and the spare tiles a method asks for (`Chunk.tile`: OTR's sampler, ASFT's reference), allocated on first use
    spare_buffers: dict[int, torch.Tensor] = {}

    def spare_tile(index: int, count: int) -> torch.Tensor:
        if index not in spare_buffers:
            spare_buffers[index] = torch.empty_like(log_prob_buffer)
        return spare_buffers[index][:count]

    for rows in tiles:
        h = hidden[rows].to(dtype)
        y = labels[rows]
        # logits into the probabilities buffer, their log_softmax into the other, then exp back over the logits: the
        # same kernels (and bits) as torch.log_softmax(...).exp(), without allocating
        count = rows.stop - rows.start
        logits, log_probs = prob_buffer[:count], log_prob_buffer[:count]
        if b is not None:
            torch.addmm(b, h, w.t(), out=logits)
        else:
            torch.mm(h, w.t(), out=logits)
        transform_logits_(logits, transform, logit_scale)
        torch.ops.aten._log_softmax.out(logits, -1, False, out=log_probs)
        label_log_probs = log_probs.gather(1, y.unsqueeze(-1)).squeeze(-1)
        if softcap is not None and want_grad:
            # logsumexp of the row, to read the capped logits back from the log-probabilities for the gradient
            log_normaliser = logits.gather(1, y.unsqueeze(-1)).squeeze(-1) - label_log_probs
        probs = torch.exp(log_probs, out=logits)
        chunk = Chunk(
            log_probs=log_probs,
            probs=probs,
            labels=y,
            label_log_probs=label_log_probs,
            rows=rows,
            inputs=chunk_inputs(row_inputs, rows),
            scratch=lambda index, count=count: spare_tile(index, count),
        )
        targets = method.targets(chunk)
        loss_sum += targets.row_loss(log_probs).sum()

        if want_metrics:
            add_metric("label_prob", label_log_probs.exp())
            add_metric("entropy", -torch.linalg.vecdot(probs, log_probs))
            add_metric("token_accuracy", (log_probs.argmax(-1) == y).to(dtype))
            for name, per_row in method.metrics(chunk, targets).items():
                add_metric(name, per_row.to(dtype))
        del chunk

        if want_grad:
            # dl/dz = (sum_v w) * p - w, scaled by the reduction; built in place in the probabilities tile
            grad_logits = probs.mul_((targets.total() * grad_scale).unsqueeze(-1))
            targets.subtract_from(grad_logits, grad_scale)
            if softcap is not None:
                # times d softcap(x) / dx = 1 - tanh^2 = 1 - (z' / c)^2, z' rebuilt in the (now free) log-probs tile
                tanh = log_probs.add_(log_normaliser.unsqueeze(-1)).div_(softcap * logit_scale)
                grad_logits.mul_(tanh.square_().neg_().add_(1.0))
            if grad_hidden is not None:
                torch.mm(grad_logits, w, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        del probs, log_probs, targets

    return loss_sum, (grad_hidden, grad_weight, grad_bias), metric_sums


def chunked_linear_loss(
    hidden, weight, bias, labels, method, row_inputs, chunk_size, denominator, metrics_out, transform=PLAIN_LOGITS
):
    """`loss_sum / denominator` of a method over `transform(hidden @ weight.T + bias)`, gradients computed in the
    forward."""

    def compute(grad_scale, needs_grad):
        loss_sum, grads, metric_sums = run_chunks(
            hidden,
            weight,
            bias,
            labels,
            method,
            row_inputs,
            chunk_size,
            grad_scale,
            metrics_out is not None,
            needs_grad,
            transform,
        )
        if metrics_out is not None:
            metrics_out.update(metric_sums)
        return loss_sum, grads

    return precomputed_gradient_loss(hidden, weight, bias, compute, denominator)


@torch.no_grad()
def chunked_label_log_probs(
    hidden, weight, bias, labels, chunk_size, logit_scale: float = 1.0, transform: LogitTransform = PLAIN_LOGITS
) -> torch.Tensor:
    """`log p(label)` per row of `softmax(logit_scale * transform(z))`, without gradient and without the full logits
    (for sequence-level methods and scoring)."""
    dtype = chunk_compute_dtype(hidden, weight, bias)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        h = hidden[rows].to(dtype)
        logits = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
        transform_logits_(logits, transform, logit_scale)
        out[rows] = logits.gather(1, labels[rows].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return out
