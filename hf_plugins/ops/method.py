"""The interface between the fused loss head and a training method.

Every loss in this library is a weighted-target cross-entropy on the logits `z_t` of a supervised token:

    l_t = - sum_v w[t, v] * log softmax(z_t)[v]        (w detached)
    dl_t / dz_t = (sum_v w[t, v]) * softmax(z_t) - w[t, :]

A method only says what `w` is, one chunk of rows at a time, and which metrics it wants; the backends own the loop
over chunks, the matmuls and the gradients. `w` is given as a sparse part (`index`, `value`: a few tokens per row,
e.g. the label) plus an optional dense part (`dense`: a full [rows, V] distribution, e.g. a reference model's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

IGNORE_INDEX = -100


@dataclass
class Targets:
    """Detached target weights of one chunk of rows: `w = scatter(index, value) + dense`.

    Attributes:
        index (`torch.LongTensor` of shape `[C, K]`, *optional*): token ids that get a sparse weight (repeats add up).
        value (`torch.Tensor` of shape `[C, K]`, *optional*): the weight of each `index` entry.
        dense (`torch.Tensor` of shape `[C, V]`, *optional*): a dense weight over the whole vocabulary.
        constant (`torch.Tensor` of shape `[C]`, *optional*): a detached per-row value added to the loss, so that a
            loss that is a weighted cross-entropy only up to a constant (a KL divergence: the target's negative
            entropy) has its exact value. It changes no gradient.
    """

    index: torch.Tensor | None = None
    value: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    constant: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        """`sum_v w[t, v]` per row, the factor of `softmax(z_t)` in the logits gradient."""
        total = 0
        if self.value is not None:
            total = self.value.sum(-1)
        if self.dense is not None:
            total = total + self.dense.sum(-1)
        return total

    def weighted_log_prob(self, log_probs: torch.Tensor) -> torch.Tensor:
        """`sum_v w[t, v] * log_probs[t, v]` per row, without building the dense weight when there is none."""
        out = torch.zeros(log_probs.shape[0], dtype=log_probs.dtype, device=log_probs.device)
        if self.index is not None:
            out = out + (self.value * log_probs.gather(1, self.index)).sum(-1)
        if self.dense is not None:
            out = out + torch.linalg.vecdot(self.dense, log_probs)
        return out

    def row_loss(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The per-row loss `-sum_v w[t, v] * log_probs[t, v] (+ constant[t])`."""
        loss = -self.weighted_log_prob(log_probs)
        return loss if self.constant is None else loss + self.constant

    def subtract_from(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad - w`, in place."""
        if self.index is not None:
            grad.scatter_add_(1, self.index, -self.value)
        if self.dense is not None:
            grad.sub_(self.dense)
        return grad


@dataclass
class Chunk:
    """What a method sees of one chunk of supervised rows. Everything is detached and in the compute dtype.

    Attributes:
        log_probs (`torch.Tensor` of shape `[C, V]`): `log softmax(z)` of the policy.
        probs (`torch.Tensor` of shape `[C, V]`): `softmax(z)`. Read only: the backend reuses it for the gradient.
        labels (`torch.LongTensor` of shape `[C]`): the label of each row (all supervised).
        label_log_probs (`torch.Tensor` of shape `[C]`): `log_probs` at the label.
        rows (`slice`): where the chunk lies among the supervised rows.
        inputs (`dict[str, torch.Tensor]`): the method's per-row inputs, sliced to the chunk.
    """

    log_probs: torch.Tensor
    probs: torch.Tensor
    labels: torch.Tensor
    label_log_probs: torch.Tensor
    rows: slice
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Rows:
    """The supervised rows of a call, handed to `LossMethod.prepare`.

    Attributes:
        labels (`torch.LongTensor` of shape `[N]`): labels of the supervised rows.
        mask (`torch.BoolTensor`): which positions of the caller's `labels` are supervised (caller's shape).
        sequence_index (`torch.LongTensor` of shape `[N]`): the sequence each row belongs to (the batch row for
            `[B, T]` inputs, 0 for flat `[N]` inputs).
        num_sequences (`int`): how many sequences the call holds.
        label_log_probs (`Callable[[], torch.Tensor]`): runs a no-grad pass of the head and returns `log p(label)`
            per row, for methods whose weights depend on whole sequences.
        vocab_size (`int`, *optional*): V, the number of rows of the lm_head weight (to check inputs over the
            vocabulary, e.g. a reference model's head).
        whole_sequence_tiles (`bool`): the backend keeps the groups of rows that `LossMethod.tile_groups` names
            (e.g. sequences) whole within one tile, so `targets` sees every row of a group at once; a method whose
            weights depend on whole sequences can then skip the `label_log_probs` pass (chunked and reference; triton
            for methods with `whole_sequence_kernel_tiles`).
    """

    labels: torch.Tensor
    mask: torch.Tensor
    sequence_index: torch.Tensor
    num_sequences: int
    label_log_probs: Callable[[], torch.Tensor]
    vocab_size: int | None = None
    whole_sequence_tiles: bool = False

    def gather(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Select a per-token input (shaped like the caller's labels) at the supervised rows, checking its shape."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"`{name}` must be a tensor shaped like `labels` {tuple(self.mask.shape)}.")
        if tuple(tensor.shape) != tuple(self.mask.shape):
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but `labels` has shape {tuple(self.mask.shape)}: "
                f"pass one `{name}` entry per label position."
            )
        return tensor.to(self.mask.device)[self.mask]


@dataclass
class KernelSpec:
    """A method's targets in the closed form a fused GPU kernel builds row by row, with no `[C, V]` target tile.

    `w = label_weight * [sg(p(y)) if dft] * one_hot(y)` (when `label_target`), plus one of: K sampled tokens from
    `softmax(z / temperature)` weighted `R(a, y) / K` (R = 1 on the label, `miss_reward` elsewhere); the exact
    expectation of that (`tempered_dense`); `kl_coef * softmax(z_ref)` with `z_ref` from a reference head.

    Attributes:
        label_target (`bool`): the label gets a sparse weight.
        label_weight (`torch.Tensor` of shape `[N]`, *optional*): its per-row weight (default 1).
        dft (`bool`): multiply the label weight by the detached `p(y)`.
        temperature (`float`): tau of the tempered policy (OTR).
        miss_reward (`float`): R of a sampled token that is not the label (OTR's beta).
        num_samples (`int`): K sampled tokens per row (0: none), drawn by inverse CDF from `uniforms` `[N, K]`.
        tempered_dense (`bool`): exact-expectation OTR, `w = (1 - beta) p_tau(y) one_hot(y) + beta p_tau`.
        reference (`tuple`, *optional*): `(ref_hidden [N, D_ref], ref_weight [V, D_ref], ref_bias [V] or None)`;
            adds `kl_coef * softmax(ref_hidden @ ref_weight.T + ref_bias)` and the reference's negative entropy.
        reference_weight (`torch.Tensor` of shape `[N]`, *optional*): a per-row factor of `kl_coef` (0 where the
            reference has no prediction); default 1.
        constant (`torch.Tensor` of shape `[N]`, *optional*): detached per-row values added to the loss (as
            `Targets.constant`): the loss gets its exact value, no gradient changes.
        row_targets (`Callable`, *optional*): two launches per tile, for weights that depend on the row's own
            `log p(y)` and entropy (GRPO). The kernel first computes the tile's per-row statistics without writing
            anything, then `row_targets(rows, label_log_probs, entropy)` (a slice of the supervised rows and two
            `[C]` tensors) returns `(label_weight, entropy_weight, loss)`, all `[C]` (`entropy_weight` may be None),
            and the second launch writes the gradient of `w = label_weight * one_hot(y) - entropy_weight * p (log p
            + H)` over the tile, still resident: no extra matmul. `loss` is the rows' exact loss (it replaces the
            kernel's).
    """

    label_target: bool = True
    label_weight: torch.Tensor | None = None
    dft: bool = False
    temperature: float = 1.0
    miss_reward: float = 0.0
    num_samples: int = 0
    uniforms: torch.Tensor | None = None
    tempered_dense: bool = False
    reference: tuple | None = None
    kl_coef: float = 0.0
    reference_weight: torch.Tensor | None = None
    constant: torch.Tensor | None = None
    row_targets: Callable | None = None


@dataclass
class KernelStats:
    """Per-row values a fused kernel returns, from which a method derives its metrics (all `[N]`).

    `aux` is method-specific: the KL to the reference (reference targets), the number of sampled tokens equal to the
    label (sampled targets) or the tempered label probability (`tempered_dense`).
    """

    label_log_probs: torch.Tensor
    aux: torch.Tensor


class LossMethod:
    """Base class of the methods the fused head understands.

    Subclasses set `name`, implement `prepare` (validate and gather the method's inputs once per call) and `targets`
    (the detached target weights of one chunk), and may add per-row metric sums in `metrics`.
    """

    name: str = "base"
    #: The method builds its whole reduction into its targets (GRPO's per-loss-type normalisers): the head hands the
    #: caller's `num_items_in_batch` to `prepare` as an input instead of dividing by it, and divides by `num_items`.
    reduces_itself: bool = False
    #: The head's softmax is over `logit_scale * z` (GRPO: 1 / temperature); `prepare` may set it, and the label
    #: log-probs pass (`Rows.label_log_probs`) already uses the value it set.
    logit_scale: float = 1.0
    #: The method's `kernel_spec` also works on tiles that keep its `tile_groups` whole (its `row_targets` forms the
    #: whole-sequence terms from the tile), so the triton backend keeps them whole too (`Rows.whole_sequence_tiles`).
    whole_sequence_kernel_tiles: bool = False

    def prepare(self, rows: Rows, **method_inputs) -> dict[str, torch.Tensor]:
        """Validate the method's inputs and return its per-row tensors (first dimension N, sliced per chunk).

        The result is the call's only state: a value that is not a tensor (e.g. an object holding the call's
        settings and what the tiles produce) is handed to every chunk as it is, and reaches `call_metrics` at the
        end of the call. Nothing is kept on the method object from one call to the next."""
        if method_inputs:
            names = ", ".join(sorted(method_inputs))
            raise ValueError(f"Method '{self.name}' takes no inputs, got: {names}.")
        return {}

    def targets(self, chunk: Chunk) -> Targets:
        raise NotImplementedError

    def metrics(self, chunk: Chunk, targets: Targets) -> dict[str, torch.Tensor]:
        """Per-row values to average over the supervised rows and report (name -> `[C]` tensor)."""
        return {}

    def call_metrics(self, metric_sums: dict[str, torch.Tensor], num_rows: int, row_inputs: dict) -> dict:
        """The metrics the head returns for the call (`return_metrics=True`), from the per-row sums of the standard
        metrics and of `metrics` over its `num_rows` supervised rows, and `prepare`'s result: by default the
        per-token means, as floats. A method may add what its sums cannot express (GRPO: TRL's statistics, as
        tensors of sums and counts that the caller reduces across processes)."""
        return {name: float(value) / max(num_rows, 1) for name, value in metric_sums.items()}

    def num_items(self, rows: Rows, row_inputs: dict[str, torch.Tensor]) -> int:
        """What the summed loss is divided by when the caller gives no `num_items_in_batch`: the number of supervised
        rows (the mean over tokens). Sequence-level methods (PoFT) return their number of sequences instead."""
        return rows.labels.numel()

    def tile_groups(self, row_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-row group ids (non-decreasing) that a backend with `Rows.whole_sequence_tiles` must not split across
        tiles, or None. A group larger than the tile gets a tile of its own."""
        return None

    def kernel_spec(self, row_inputs: dict[str, torch.Tensor]) -> KernelSpec | None:
        """The method's targets in the fused kernels' closed form, or None when they have none (then the GPU
        backends fall back to `chunked`). Called after `prepare`, with its per-row tensors."""
        return None

    def kernel_metrics(self, stats: KernelStats, row_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's own per-row metrics (the same names as `metrics`) from a fused kernel's per-row values."""
        return {}


def label_targets(labels: torch.Tensor, weights: torch.Tensor) -> Targets:
    """Targets with one weighted entry per row, on the label: `w = weights * one_hot(labels)`."""
    return Targets(index=labels.unsqueeze(-1), value=weights.unsqueeze(-1))
