"""The interface between the fused loss head and a training method.

Every loss in this library is a weighted-target cross-entropy on the logits `z_t` of a supervised token:

    l_t = - sum_v w[t, v] * log softmax(z_t)[v]        (w detached)
    dl_t / dz_t = (sum_v w[t, v]) * softmax(z_t) - w[t, :]

A method only says what `w` is, one chunk of rows at a time, and which metrics it wants; the backends own the loop
over chunks, the matmuls and the gradients. `w` is given as a sparse part (`index`, `value`: a few tokens per row,
e.g. the label) plus an optional dense part (`dense`: a full [rows, V] distribution, e.g. a reference model's).

State: a `LossMethod`'s attributes are its configuration, set when it is built and never written by a call. The
result of `prepare` is the only per-call state: every later hook of the call (`targets` and `metrics` through
`Chunk.inputs`, `num_items`, `metric_counts`, `tile_groups`, `kernel_spec`, `kernel_metrics`) reads what it needs
from it, so one method object serves any number of calls, in any order, and keeps nothing of a call once it returns.
What a caller wants to know about a call (per-sequence statistics) comes back as metrics (see `LossMethod.metrics`
and `LossMethod.metric_counts`), not as attributes read off the method afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch


IGNORE_INDEX = -100


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to `hidden @ W.T + b` before its softmax: `z' = softcap * tanh(scale * z / softcap)`, or
    `scale * z` without a soft-cap (Gemma 2/3's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's
    `1 / logits_scaling`, ...; `hf_plugins.modeling.logit_transform` reads it from a model's config).

    Every target weight of a method applies to `z'`. A method's own `LossMethod.logit_scale` (GRPO's 1 / temperature)
    multiplies `z'` after the soft-cap, as TRL's fused head divides the soft-capped logits by the temperature.

    Attributes:
        scale (`float`): the factor on the lm_head's output.
        softcap (`float`, *optional*): the soft-cap `c > 0`, applied after the scale; None for none.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        scale, softcap = self.scale, self.softcap
        if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
            raise ValueError(f"The logit scale must be a finite number, got {scale!r}.")
        if softcap is not None and (
            isinstance(softcap, bool) or not isinstance(softcap, Real) or not math.isfinite(softcap) or softcap <= 0
        ):
            raise ValueError(f"The logit soft-cap must be a finite number > 0 (or None for none), got {softcap!r}.")
        object.__setattr__(self, "scale", float(scale))
        object.__setattr__(self, "softcap", None if softcap is None else float(softcap))

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """`z'` of `logits` (out of place, differentiable): the readable definition the backends follow."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


#: The identity transform: plain `hidden @ W.T + b` logits
PLAIN_LOGITS = LogitTransform()


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
        uniform_mass (`torch.Tensor` of shape `[C]`, *optional*): a per-row weight spread evenly over the
            vocabulary, `uniform_mass / V` on every token (label smoothing: `eps`), kept as one number per row
            instead of a dense `[C, V]` tile.
        loss (`torch.Tensor` of shape `[C]`, *optional*): the detached per-row loss, when the method computes it
            together with its targets (ASFT, from its KL). It must equal the cross-entropy against the targets plus
            `constant`; `row_loss` then returns it as its value, without another pass over the tile.
    """

    index: torch.Tensor | None = None
    value: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    constant: torch.Tensor | None = None
    uniform_mass: torch.Tensor | None = None
    loss: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        """`sum_v w[t, v]` per row, the factor of `softmax(z_t)` in the logits gradient."""
        total = 0
        if self.value is not None:
            total = self.value.sum(-1)
        if self.dense is not None:
            total = total + self.dense.sum(-1)
        if self.uniform_mass is not None:
            total = total + self.uniform_mass
        return total

    def weighted_log_prob(self, log_probs: torch.Tensor) -> torch.Tensor:
        """`sum_v w[t, v] * log_probs[t, v]` per row, without building the dense weight when there is none."""
        out = torch.zeros(log_probs.shape[0], dtype=log_probs.dtype, device=log_probs.device)
        if self.index is not None:
            out = out + (self.value * log_probs.gather(1, self.index)).sum(-1)
        if self.dense is not None:
            out = out + torch.linalg.vecdot(self.dense, log_probs)
        if self.uniform_mass is not None:
            out = out + self.uniform_mass * log_probs.mean(-1)
        return out

    def row_loss(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The per-row loss `-sum_v w[t, v] * log_probs[t, v] (+ constant[t])`."""
        if self.loss is not None and not log_probs.requires_grad:
            return self.loss  # the backends that compute the gradients themselves only need the value
        loss = -self.weighted_log_prob(log_probs)
        if self.loss is not None:
            # autograd (the reference backend) gets the cross-entropy's gradient, the value is the method's
            return self.loss + (loss - loss.detach())
        return loss if self.constant is None else loss + self.constant

    def subtract_from(self, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """`grad - scale * w`, in place (the targets themselves are not scaled: no `[C, V]` copy of a dense part)."""
        if self.index is not None:
            grad.scatter_add_(1, self.index, self.value * -scale)
        if self.dense is not None:
            grad.sub_(self.dense, alpha=scale)
        if self.uniform_mass is not None:
            grad.sub_((self.uniform_mass * scale / grad.shape[-1]).unsqueeze(-1))
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
        inputs (`dict[str, Any]`): the result of the method's `prepare` for this call: its per-row tensors sliced to
            the chunk, its other values (per-call settings) as they are (see `chunk_inputs`).
        scratch (`Callable[[int], torch.Tensor]`, *optional*): the backend's spare tiles, read through `tile`.
    """

    log_probs: torch.Tensor
    probs: torch.Tensor
    labels: torch.Tensor
    label_log_probs: torch.Tensor
    rows: slice
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    scratch: Callable[[int], torch.Tensor] | None = None

    def tile(self, index: int) -> torch.Tensor:
        """A `[C, V]` tile in the compute dtype that the method may overwrite (contents undefined), for its own
        per-chunk work and its targets; tiles of different `index` are distinct. The chunked backend keeps each for
        the whole call and hands it to every chunk (a fresh `[C, V]` allocation per chunk costs page faults), so it
        is valid only until the chunk's gradient is done. Without a backend's tiles, a new one."""
        if self.scratch is None:
            return torch.empty_like(self.log_probs)
        return self.scratch(index)


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
    expectation of that (`tempered_dense`); `kl_coef * softmax(z_ref)` with `z_ref` from a reference head; plus
    `uniform_mass / V` on every token (label smoothing).

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
        reference_transform (`LogitTransform`): what the reference model does to its lm_head's output before its
            softmax (its soft-cap and scale).
        uniform_mass (`torch.Tensor` of shape `[N]`, *optional*): a per-row weight spread evenly over the
            vocabulary, `uniform_mass / V` on every token (label smoothing: `eps`).
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
    reference_transform: LogitTransform = PLAIN_LOGITS
    uniform_mass: torch.Tensor | None = None
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


def chunk_inputs(row_inputs: dict[str, Any], rows: slice) -> dict[str, Any]:
    """`prepare`'s result as one chunk sees it: every tensor is per-row (first dimension N) and is sliced to `rows`;
    any other value (a number, a settings dataclass, a tuple holding per-call tensors such as a reference lm_head)
    is per-call and passed as it is."""
    return {name: value[rows] if isinstance(value, torch.Tensor) else value for name, value in row_inputs.items()}


class LossMethod:
    """Base class of the methods the fused head understands.

    Subclasses set `name`, implement `prepare` (validate and gather the method's inputs once per call) and `targets`
    (the detached target weights of one chunk), and may add per-row metric values in `metrics`.

    A method object keeps no state between calls (see the module docstring): its attributes are configuration (e.g.
    OTR's default settings and its generator, which each call draws from), set in `__init__`; everything a call needs
    after `prepare` is in the dict `prepare` returns. Its tensors are per-row inputs, sliced to each chunk; its other
    values are per-call settings (the call's `kl_coef`, `beta`, a reference head wrapped in a small dataclass), handed
    whole to every hook.
    """

    name: str = "base"
    #: The method builds its whole reduction into its targets (GRPO's per-loss-type normalisers): the head hands the
    #: caller's `num_items_in_batch` to `prepare` as an input instead of dividing by it, and divides by `num_items`.
    reduces_itself: bool = False
    #: The head's softmax is over `logit_scale * z'` (GRPO: 1 / temperature), with `z'` the model's logits (after its
    #: `LogitTransform`); the backends and the label log-probs pass (`Rows.label_log_probs`) read it after `prepare`.
    #: GRPO's `prepare` still sets it from the call's options: the one attribute a call writes, until the head takes
    #: the scale as a per-call value.
    logit_scale: float = 1.0
    #: The method's `kernel_spec` also works on tiles that keep its `tile_groups` whole (its `row_targets` forms the
    #: whole-sequence terms from the tile), so the triton backend keeps them whole too (`Rows.whole_sequence_tiles`).
    whole_sequence_kernel_tiles: bool = False

    def prepare(self, rows: Rows, **method_inputs) -> dict[str, Any]:
        """Validate the method's inputs and return the call's state: per-row tensors (first dimension N, sliced per
        chunk) and per-call values (any non-tensor, passed whole; see `chunk_inputs`). Must not write to `self`."""
        if method_inputs:
            names = ", ".join(sorted(method_inputs))
            raise ValueError(f"Method '{self.name}' takes no inputs, got: {names}.")
        return {}

    def targets(self, chunk: Chunk) -> Targets:
        raise NotImplementedError

    def metrics(self, chunk: Chunk, targets: Targets) -> dict[str, torch.Tensor]:
        """Per-row values to report (name -> `[C]` tensor). The head sums each over the call's rows and divides the
        sum by the number of supervised rows (a token mean), or by the count `metric_counts` gives for it."""
        return {}

    def metric_counts(self, rows: Rows, row_inputs: dict[str, Any]) -> dict[str, int | torch.Tensor]:
        """The metrics that are not token means, each with the count its summed per-row values are divided by (name
        -> count). A per-sequence mean spreads each sequence's value over its rows (value / T_i per row, so that the
        rows of sequence i sum to its value) and gives the number of sequences as the count (PoFT). The head returns
        such a metric with its count (`fused_linear_loss(return_metrics="sums")`), so that callers reduce it across
        processes as a mean over sequences, not over tokens. Default: none (every metric is a token mean)."""
        return {}

    def call_metrics(self, row_inputs: dict[str, Any]) -> dict[str, Any]:
        """What the method reports for the whole call, from `prepare`'s result after every tile ran, added to the
        metrics the head returns as it is (GRPO: TRL's statistics, as an object of sums and counts that the caller
        reduces across processes). Default: nothing."""
        return {}

    def num_items(self, rows: Rows, row_inputs: dict[str, Any]) -> int | torch.Tensor:
        """What the summed loss is divided by when the caller gives no `num_items_in_batch`: the number of supervised
        rows (the mean over tokens). Sequence-level methods (PoFT) return their number of sequences instead (a 0-d
        tensor is read only when needed)."""
        return rows.labels.numel()

    def tile_groups(self, row_inputs: dict[str, Any]) -> torch.Tensor | None:
        """Per-row group ids (non-decreasing) that a backend with `Rows.whole_sequence_tiles` must not split across
        tiles, or None. A group larger than the tile gets a tile of its own."""
        return None

    def kernel_spec(self, row_inputs: dict[str, Any]) -> KernelSpec | None:
        """The method's targets in the fused kernels' closed form, or None when they have none (then the GPU
        backends fall back to `chunked`). Called after `prepare`, with its result."""
        return None

    def kernel_metrics(self, stats: KernelStats, row_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The method's own per-row metrics (the same names as `metrics`) from a fused kernel's per-row values."""
        return {}


def label_targets(labels: torch.Tensor, weights: torch.Tensor) -> Targets:
    """Targets with one weighted entry per row, on the label: `w = weights * one_hot(labels)`."""
    return Targets(index=labels.unsqueeze(-1), value=weights.unsqueeze(-1))
