"""The `triton` backend: cuBLAS matmuls for the three products, one Triton kernel for everything between them.

Per tile of rows: `z = h @ W.T (+ b)` into a reused buffer (cuBLAS), the kernel turns it into the logits gradient in
place (and, for ASFT, reads a reference tile computed the same way), then `grad_h = g @ W` and `grad_W += g.T @ h`
(cuBLAS again). Gradients are computed in the forward pass and only scaled in backward: three matmuls per tile
(four for ASFT, whose reference logits are one more), never a `[N, V]` tensor, one `[rows, V]` tile (two for ASFT).

Tiles hold the compute dtype (the autocast dtype under autocast, else the inputs' dtype): bf16 tiles are what
cuBLAS writes at full speed, and the kernel upcasts every value it reads to float32. A model's logit transform (scale,
soft-cap) is applied by the kernel to every value it reads, and its Jacobian to the gradient it writes: the tile
holds the lm_head's plain output.
"""

from __future__ import annotations

import math

import torch

from ..chunked import tile_slices
from ..method import PLAIN_LOGITS, KernelSpec, KernelStats, LogitTransform, LossMethod
from ..precomputed import precomputed_gradient_loss


#: Vocabulary block per kernel iteration and warps per row program (OTR's sampled targets have their own pair: the
#: sampler holds a K x BLOCK comparison). Measured on an H200, docs/benchmarks.md.
DEFAULT_BLOCK_V = 4096
DEFAULT_NUM_WARPS = 8
SAMPLING_BLOCK_V = 1024
SAMPLING_NUM_WARPS = 4
#: Row-tile budget: about max(N * D, MIN_TILE_ELEMENTS) logits (rows rounded to the nearest power of two), the bound
#: Liger's fused linear cross-entropy uses, so that the tile costs about what the hidden states cost.
MIN_TILE_ELEMENTS = 1 << 22
MIN_TILE_ROWS = 128


def default_tile_rows(num_rows: int, vocab_size: int, hidden_size: int) -> int:
    budget = max(num_rows * hidden_size, MIN_TILE_ELEMENTS)
    rows = max(MIN_TILE_ROWS, budget / max(vocab_size, 1))
    rows = 1 << round(math.log2(rows))
    return max(1, min(rows, num_rows))


def tile_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.float64 in (hidden.dtype, weight.dtype):
        return torch.float64
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b`; a float32 accumulator from bf16/fp16 operands gets the product unrounded (cuBLAS out_dtype)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def run_tiles(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    spec: KernelSpec,
    chunk_size: int | None,
    grad_scale: float | None,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    logit_scale: float = 1.0,
    groups: torch.Tensor | None = None,
    transform: LogitTransform = PLAIN_LOGITS,
):
    """One pass over the supervised rows of the logits `logit_scale * transform(hidden @ weight.T + bias)`. Returns
    `(loss_sum, (grad_hidden, grad_weight, grad_bias), stats)` with `stats` the kernel's `[N, NUM_STATS]` per-row
    values (float32, float64 for float64 inputs). With `groups` (per-row ids, `LossMethod.tile_groups`) no tile splits
    a group (a group longer than the tile gets a tile of its own)."""
    import triton.language as tl

    from .kernels import NUM_PARAMS, NUM_STATS, STAT_ENTROPY, STAT_LABEL_LOGP, STAT_LOSS, weighted_target_ce_kernel

    device = hidden.device
    dtype = tile_dtype(hidden, weight)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    want_grad = grad_scale is not None and any(needs_grad)
    need_hidden, need_weight, need_bias = (want_grad and flag for flag in needs_grad)
    need_bias = need_bias and bias is not None
    logit_scale = float(logit_scale)

    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    # The weight gradient accumulates over row tiles in the weight's own precision (float32 under mixed precision)
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, dtype), device=device)
        if need_weight
        else None
    )
    grad_hidden = torch.empty((n_rows, hidden_size), dtype=dtype, device=device) if need_hidden else None
    grad_bias = torch.zeros(vocab_size, dtype=acc_dtype, device=device) if need_bias else None
    stats = torch.zeros((n_rows, NUM_STATS), dtype=acc_dtype, device=device)
    if n_rows == 0:
        return stats[:, 0].sum(), (grad_hidden, grad_weight, grad_bias), stats

    rows_per_tile = chunk_size or default_tile_rows(n_rows, vocab_size, hidden_size)
    tiles = tile_slices(n_rows, min(rows_per_tile, n_rows), groups)
    rows_per_tile = max(tile.stop - tile.start for tile in tiles)
    tile_buffer = torch.empty((rows_per_tile, vocab_size), dtype=dtype, device=device)

    reference = spec.reference
    if reference is not None:
        ref_hidden, ref_weight, ref_bias = reference
        ref_w = ref_weight.to(dtype)
        ref_b = ref_bias.to(dtype) if ref_bias is not None else None
        ref_buffer = torch.empty((rows_per_tile, vocab_size), dtype=dtype, device=device)

    # The z-gradient of a loss of logit_scale * softcap(scale * z) carries both factors (the kernel applies the cap's
    # Jacobian elementwise)
    scaled_grad = grad_scale * logit_scale * transform.scale if want_grad else 0.0
    ref_transform = spec.reference_transform
    values = [
        scaled_grad, 1.0 / spec.temperature, spec.miss_reward, spec.kl_coef, logit_scale, transform.scale,
        transform.softcap or 1.0, ref_transform.scale, ref_transform.softcap or 1.0,
    ]  # fmt: skip
    params = torch.tensor(values + [0.0] * (NUM_PARAMS - len(values)), dtype=acc_dtype, device=device)
    label_weight = spec.label_weight.to(device=device, dtype=acc_dtype) if spec.label_weight is not None else None
    reference_weight = spec.reference_weight
    if reference_weight is not None:
        reference_weight = reference_weight.to(device=device, dtype=acc_dtype)
    uniforms = spec.uniforms.to(device=device, dtype=acc_dtype).contiguous() if spec.num_samples else None
    uniform_mass = spec.uniform_mass
    if uniform_mass is not None:
        uniform_mass = uniform_mass.to(device=device, dtype=acc_dtype).contiguous()
    k_pad = 1 << max(0, (max(spec.num_samples, 1) - 1).bit_length())
    block_v = SAMPLING_BLOCK_V if spec.num_samples else DEFAULT_BLOCK_V
    num_warps = SAMPLING_NUM_WARPS if spec.num_samples else DEFAULT_NUM_WARPS
    block_v = min(block_v, triton_next_power_of_2(vocab_size))
    num_warps = min(num_warps, max(1, block_v // 256))  # small vocabularies: no idle warps

    def launch(tile, ref_tile, rows, row_label_weight, row_entropy_weight, write_grad, last_pass):
        row_uniforms = uniforms[rows] if uniforms is not None else tile
        weighted_target_ce_kernel[(rows.stop - rows.start,)](
            tile,
            tile.stride(0),
            ref_tile,
            ref_tile.stride(0),
            labels[rows],
            row_label_weight if row_label_weight is not None else stats,
            reference_weight[rows] if reference_weight is not None else stats,
            row_entropy_weight if row_entropy_weight is not None else stats,
            uniform_mass[rows] if uniform_mass is not None else stats,
            row_uniforms,
            row_uniforms.stride(0),
            stats[rows],
            params,
            vocab_size,
            LABEL_TARGET=spec.label_target,
            HAS_LABEL_WEIGHT=row_label_weight is not None,
            DFT=spec.dft,
            TEMPERED=spec.num_samples > 0 or spec.tempered_dense,
            TEMPERED_DENSE=spec.tempered_dense,
            NUM_SAMPLES=spec.num_samples,
            K_PAD=k_pad,
            REFERENCE=reference is not None,
            HAS_REFERENCE_WEIGHT=reference_weight is not None,
            HAS_ENTROPY_WEIGHT=row_entropy_weight is not None,
            HAS_UNIFORM=uniform_mass is not None,
            SOFTCAP=transform.softcap is not None,
            REF_SOFTCAP=ref_transform.softcap is not None,
            WRITE_GRAD=write_grad,
            LAST_PASS=last_pass,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )

    for rows in tiles:
        count = rows.stop - rows.start
        h = hidden[rows].to(dtype)
        tile = tile_buffer[:count]
        torch.mm(h, w.t(), out=tile)
        if b is not None:
            tile.add_(b)
        ref_tile = tile
        if reference is not None:
            ref_tile = ref_buffer[:count]
            torch.mm(ref_hidden[rows].to(dtype), ref_w.t(), out=ref_tile)
            if ref_b is not None:
                ref_tile.add_(ref_b)
        if spec.row_targets is None:
            last_pass = want_grad or spec.tempered_dense or reference is not None
            launch(
                tile,
                ref_tile,
                rows,
                label_weight[rows] if label_weight is not None else None,
                None,
                want_grad,
                last_pass,
            )
        else:
            # Two launches on the resident tile: the rows' statistics first, then the gradient of the weights the
            # method forms from them (no second matmul)
            launch(tile, ref_tile, rows, None, None, False, False)
            row_stats = stats[rows]
            weights, entropy_weights, row_loss = spec.row_targets(
                rows, row_stats[:, STAT_LABEL_LOGP].clone(), row_stats[:, STAT_ENTROPY].clone()
            )
            if want_grad:
                weights = weights.to(device=device, dtype=acc_dtype).contiguous()
                if entropy_weights is not None:
                    entropy_weights = entropy_weights.to(device=device, dtype=acc_dtype).contiguous()
                launch(tile, ref_tile, rows, weights, entropy_weights, True, True)
            stats[rows, STAT_LOSS] = row_loss.to(acc_dtype)
        if want_grad:
            if grad_hidden is not None:
                torch.mm(tile, w, out=grad_hidden[rows])
            if grad_weight is not None:
                _accumulate(grad_weight, tile.t(), h)
            if grad_bias is not None:
                grad_bias += tile.sum(0, dtype=acc_dtype)
    if spec.constant is not None:
        stats[:, 0] += spec.constant.to(device=device, dtype=acc_dtype)
    return stats[:, 0].sum(), (grad_hidden, grad_weight, grad_bias), stats


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def _metric_sums(method: LossMethod, row_inputs, stats: torch.Tensor) -> dict[str, torch.Tensor]:
    from .kernels import STAT_AUX, STAT_ENTROPY, STAT_LABEL_LOGP, STAT_LABEL_PROB, STAT_TOP1

    sums = {
        "label_prob": stats[:, STAT_LABEL_PROB].sum(),
        "entropy": stats[:, STAT_ENTROPY].sum(),
        "token_accuracy": stats[:, STAT_TOP1].sum(),
    }
    kernel_stats = KernelStats(label_log_probs=stats[:, STAT_LABEL_LOGP], aux=stats[:, STAT_AUX])
    for name, per_row in method.kernel_metrics(kernel_stats, row_inputs).items():
        sums[name] = per_row.to(stats.dtype).sum()
    return sums


def triton_linear_loss(
    hidden, weight, bias, labels, method, row_inputs, spec, chunk_size, denominator, metrics_out,
    transform=PLAIN_LOGITS,
):  # fmt: skip
    """`loss_sum / denominator` over `transform(hidden @ weight.T + bias)`, gradients computed in the forward pass and
    scaled in place in backward (the weight-sized gradient is never copied)."""

    def compute(grad_scale, needs_grad):
        loss_sum, grads, stats = run_tiles(
            hidden,
            weight,
            bias,
            labels,
            spec,
            chunk_size,
            grad_scale,
            needs_grad,
            method.logit_scale,
            method.tile_groups(row_inputs),
            transform,
        )
        if metrics_out is not None:
            metrics_out.update(_metric_sums(method, row_inputs, stats))
        return loss_sum, grads

    return precomputed_gradient_loss(hidden, weight, bias, compute, denominator, scale_in_place=True)
