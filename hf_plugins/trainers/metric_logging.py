"""Step metrics that stay on the device until TRL logs them.

TRL's trainers append one float per step to `self._metrics[mode][name]` and average each list when they log, which
costs a host sync (`.item()`) per metric per step. Our trainers append device values instead (a `StepMean`: the
step's sum and count over every process, or a 0-d tensor), and `read_on_host` turns every pending value into a float
with one transfer per dtype and logging step, just before TRL averages the lists. The division happens on the host,
in Python floats, as a per-step `.item()` would have done it: the logged numbers are the same.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch


#: Metric names as TRL's SFTTrainer logs them, for the metrics both compute
TRL_METRIC_NAMES = {"token_accuracy": "mean_token_accuracy", "entropy": "entropy", "label_prob": "mean_label_prob"}


@dataclass
class StepMean:
    """One step's mean `total / count` over every process, its two parts still on the device (0-d tensors). A step
    whose count is 0 logs `empty` (0.0 for token means, as TRL logs them), or nothing when `empty` is None (a mean
    over sequences has no value without sequences)."""

    total: torch.Tensor
    count: torch.Tensor
    empty: float | None = 0.0


def reduce_head_metrics(accelerator, metric_sums: dict) -> dict[str, StepMean]:
    """The step's value of each of the head's metrics over every process, without a host sync.

    `metric_sums` is what the fused head returns (`fused_linear_loss(..., return_metrics="sums")`): `num_tokens`, each
    token mean as its sum over the supervised tokens and each metric with its own count as a `(sum, count)` pair. A
    token mean is the sum over the processes divided by their tokens (0.0 for a step without any, as TRL logs its
    token means); a pair, its sum over the processes divided by its count's (left out of a step without any). Names
    are TRL's where TRL logs the same metric.
    """
    sums = dict(metric_sums)
    num_tokens = sums.pop("num_tokens")
    names = sorted(sums)
    if not names:
        return {}
    device = accelerator.device
    values = []
    for name in names:
        total, count = sums[name] if isinstance(sums[name], tuple) else (sums[name], num_tokens)
        values += [total, count]
    # float32 whatever the compute dtype (MPS has no float64): counts are exact up to 2^24 per step
    local = torch.stack([_on_device(value, device) for value in values])
    totals = accelerator.gather_for_metrics(local.unsqueeze(0)).sum(0).view(-1, 2)
    return {
        TRL_METRIC_NAMES.get(name, name): StepMean(total, count, None if isinstance(sums[name], tuple) else 0.0)
        for name, (total, count) in zip(names, totals, strict=True)
    }


def _on_device(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    # a fill kernel, not a copy from host memory: nothing waits for the device
    return torch.full((), float(value), dtype=torch.float32, device=device)


def read_on_host(metrics: dict[str, list]) -> None:
    """Replace, in place, every device value in the lists of `metrics` (one `self._metrics[mode]`) by its float, with
    one transfer per device and dtype. A `StepMean` of a step without count and without `empty` value is dropped, and
    a metric left without any value is removed, as if never logged."""
    tensors = []  # every pending tensor, in the order the entries are read back below
    for entries in metrics.values():
        for entry in entries:
            if isinstance(entry, StepMean):
                tensors += [entry.total, entry.count]
            elif isinstance(entry, torch.Tensor):
                tensors.append(entry)
    if not tensors:
        return
    groups = defaultdict(list)
    for index, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(index)
    host = [None] * len(tensors)
    for indices in groups.values():
        values = torch.stack([tensors[i].reshape(()) for i in indices]).tolist()
        for index, value in zip(indices, values, strict=True):
            host[index] = value
    read = iter(host)
    for name in list(metrics):
        entries = []
        for entry in metrics[name]:
            if isinstance(entry, StepMean):
                total, count = next(read), next(read)
                if count > 0:
                    entries.append(total / count)
                elif entry.empty is not None:
                    entries.append(entry.empty)
            elif isinstance(entry, torch.Tensor):
                entries.append(next(read))
            else:
                entries.append(entry)
        if entries:
            metrics[name] = entries
        else:
            del metrics[name]
