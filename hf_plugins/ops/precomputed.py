"""The autograd node of the backends that compute the gradients in the forward pass (chunked, triton).

Their targets are known in the forward pass, so they produce the loss and the gradients for hidden, weight and bias
in one sweep over the tiles; backward only multiplies those gradients by the incoming scalar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


#: `compute(grad_scale, needs_grad) -> (loss_sum, (grad_hidden, grad_weight, grad_bias))`: the gradients of
#: `grad_scale * loss_sum` for the inputs `needs_grad` flags (None when `grad_scale` is None).
Compute = Callable[[float | None, tuple], tuple]


class PrecomputedGradientLoss(torch.autograd.Function):
    """`loss_sum / denominator`, with the gradients `compute` returned in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, compute: Compute, denominator: float, scale_in_place: bool):
        needs_grad = tuple(ctx.needs_input_grad[:3])
        loss_sum, grads = compute(1.0 / denominator if any(needs_grad) else None, needs_grad)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.scale_in_place = scale_in_place
        return loss_sum / denominator

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.scale_in_place:
            if getattr(ctx, "consumed", False):
                raise RuntimeError(
                    "This loss head computes its gradients once and scales them in place: it cannot run backward "
                    "twice (retain_graph=True). Use backend='chunked' for that."
                )
            ctx.consumed = True
        # The loss is usually the last node (grad_output == 1): then the saved gradients are returned as they are, no
        # pass over the weight-sized gradient and no second copy of it. Without retain_graph autograd frees the saved
        # tensors once this returns, so the weight's AccumulateGrad takes the tensor itself as `.grad`; with it they
        # stay saved, and AccumulateGrad copies them (it never keeps a tensor referenced elsewhere), so a second
        # backward still starts from intact gradients.
        unit = bool(torch.equal(grad_output, torch.ones_like(grad_output)))
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is not None and not unit:
                if not ctx.scale_in_place:
                    grad = grad * grad_output.to(grad.dtype)
                else:  # in place: a second weight-sized buffer would raise the peak memory for nothing
                    grad.mul_(grad_output.to(grad.dtype))
            grads.append(grad.to(dtype) if grad is not None else None)
        return (*grads, None, None, None)


def precomputed_gradient_loss(hidden, weight, bias, compute: Compute, denominator: float, scale_in_place=False):
    """The loss as a graph node; under `torch.no_grad()` (evaluation) `compute` runs without any gradient."""
    if not torch.is_grad_enabled():
        # autograd still reports `needs_input_grad` under no_grad: skip the Function and the gradients
        loss_sum, _ = compute(None, (False, False, False))
        return loss_sum / denominator
    return PrecomputedGradientLoss.apply(hidden, weight, bias, compute, denominator, scale_in_place)
