"""GRPO's policy loss, as TRL 1.16's `GRPOTrainer._compute_loss` computes it, for every `loss_type`.

Per completion i and completion token t (loss mask m_t, advantage A, current log-prob lp_t of the label at logits
divided by the temperature, old log-prob o_t, reference log-prob q_t), with the ratio `r_t = exp(lp_t - o_t)` at the
token level or `s_i = exp(sum_t m_t (lp_t - o_t) / T_i)` at the sequence level (GSPO), each token's loss is

    L_t = W_t * m_t * (M_i * rho_t * l_t + beta * kl_t) - kappa_t * H_t

with the policy term `l_t` of the loss type (clipped ratio, CISPO's clipped weight, SAPO's soft gate, VESPO's gamma
weight), the off-policy sequence mask M_i (`off_policy_mask_threshold`), the vLLM importance-sampling ratio rho_t,
the k3 estimate `kl_t = e^(q-lp) - (q-lp) - 1` (times the ratio with `use_bias_correction_kl`), the loss type's
normaliser W_t (per sequence, per local or generation batch, with gradient accumulation) and the entropy bonus
`kappa_t = entropy_coef / (max(sum m, 1) * G)` on the entropy H_t of the tempered distribution. `grpo_loss` is that
loss on materialised logits, written as TRL writes it (the readable definition the fused head must match).

As a target-weight rule (DESIGN.md §1) every term is a function of lp_t and H_t only, so the gradient with respect
to the logits is

    dL/dz_t = c_t * (softmax(z_t) - one_hot(y_t)) + kappa_t * p_t * (log p_t + H_t),        c_t = -dL/dlp_t

`GRPOMethod` ("grpo") computes c_t in closed form inside each row tile (per loss type: docs/methods/grpo.md) and the
entropy bonus as a dense target `w = -kappa_t * p (log p + H)` (sum 0), and adds per-row constants so that the value
it returns is TRL's loss, not a surrogate. Sequence-level quantities (s_i, VESPO's gamma weight and the off-policy
mask off-policy, the sequence-level bias-corrected KL) need whole sequences: the tiles then hold whole sequences
(three matmuls, every backend); when a completion is too long for one tile, a first no-grad pass of the head gives
them (four matmuls, like TRL).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from ..ops.method import Chunk, KernelSpec, LossMethod, Rows, Targets
from ..utils import is_integer, is_real
from ._common import check_labels, compute_dtype


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: Loss types whose policy term is PPO's clipped ratio objective `-min(r A, clamp(r, 1 - eps, 1 + eps_high) A)`
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: Loss types normalised by the number of loss tokens of the whole generation batch (TRL's `num_items_in_batch`)
GENERATION_BATCH_LOSS_TYPES = ("cispo", "dapo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
#: The `GRPOConfig` fields that `grpo_loss` and `GRPOMethod` take under the same name, with the same meaning
GRPO_CONFIG_FIELDS = (
    "loss_type",
    "importance_sampling_level",
    "beta",
    "use_bias_correction_kl",
    "epsilon",
    "epsilon_high",
    "delta",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "off_policy_mask_threshold",
    "temperature",
    "max_completion_length",
    "steps_per_generation",
)
#: log(1e-8): VESPO's lower clamp of the log importance weight (TRL's `get_gamma_weights`)
VESPO_LOG_MIN = math.log(1e-8)
#: Largest whole-sequence tile (elements of [rows, V]) the chunked backend may build for sequence-level terms;
#: longer completions take a first no-grad pass instead (one more matmul per tile, no tile beyond the usual)
SEQUENCE_TILE_BUDGET = 1 << 26


# ------------------------------------------------------------------------------------------------------- options


def _is_count(value) -> bool:
    return is_integer(value) and value >= 1


@dataclass(frozen=True)
class GRPOOptions:
    """The scalar settings of one GRPO loss call, validated. The names and defaults are `GRPOConfig`'s (TRL 1.16),
    except the trainer state: `num_processes` (`accelerator.num_processes`), `steps_per_generation`,
    `gradient_accumulation_steps` (TRL's `current_gradient_accumulation_steps`, the micro-steps of the current
    optimizer step) and `training` (False in evaluation, where no accumulation normaliser applies). `entropy_coef`
    is the coefficient applied to this call (under adaptive entropy control: `entropy_coef` when the previous
    window's entropy was at most `entropy_target`, else 0)."""

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    temperature: float = 1.0
    entropy_coef: float = 0.0
    max_completion_length: int | None = None
    num_processes: int = 1
    steps_per_generation: int = 1
    gradient_accumulation_steps: int = 1
    training: bool = True

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {', '.join(map(repr, LOSS_TYPES))}, got {self.loss_type!r}.")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"`importance_sampling_level` must be 'token' or 'sequence', got {self.importance_sampling_level!r}."
            )
        optional = ("epsilon_high", "delta", "off_policy_mask_threshold")
        for spec in fields(self):
            name, value = spec.name, getattr(self, spec.name)
            if name in ("loss_type", "importance_sampling_level", "max_completion_length") or (
                name in optional and value is None
            ):
                continue
            if name in ("use_bias_correction_kl", "training"):
                if not isinstance(value, bool):
                    raise ValueError(f"`{name}` must be True or False, got {value!r}.")
            elif name in ("num_processes", "steps_per_generation", "gradient_accumulation_steps"):
                if not _is_count(value):
                    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
            elif not is_real(value) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if self.temperature <= 0:
            raise ValueError(
                f"`temperature` must be > 0 (the logits are divided by it, as for sampling), got {self.temperature}."
            )
        if self.max_completion_length is not None and not _is_count(self.max_completion_length):
            raise ValueError(
                f"`max_completion_length` must be a positive integer, got {self.max_completion_length!r}."
            )
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError(
                "`loss_type='dr_grpo'` divides by `max_completion_length`: pass it (GRPOConfig.max_completion_length)."
            )

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        """TRL's `epsilon_high`: `epsilon_high` if set, else `epsilon` (also CISPO's absolute cap)."""
        return self.epsilon_high if self.epsilon_high is not None else self.epsilon

    @property
    def accumulation(self) -> int:
        """G: the gradient-accumulation normaliser (1 in evaluation)."""
        return self.gradient_accumulation_steps if self.training else 1

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"


def grpo_options(options: dict) -> GRPOOptions:
    """`GRPOOptions(**options)`, with a `ValueError` naming an option it does not know."""
    known = {spec.name for spec in fields(GRPOOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"Unknown GRPO option(s) {', '.join(map(repr, unknown))}: the options are {', '.join(sorted(known))} "
            "(entropy masking, `top_entropy_quantile < 1`, is not supported)."
        )
    return GRPOOptions(**options)


# ---------------------------------------------------------------------------------------------------- statistics


@dataclass
class GRPOStatistics:
    """What TRL's `_compute_loss` logs, as local sufficient statistics (reduce them across processes with
    `metrics`).

    Attributes:
        masked_means (`dict[str, torch.Tensor]`): TRL metric name -> `(sum, count)` of a global masked mean: `kl`
            (when beta != 0), `entropy`, `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`
            (clipped loss types), `cispo_clip_ratio` (cispo), `vespo/phi_seq_mean` (vespo).
        sequence_values (`dict[str, torch.Tensor]`): `clip_ratio/low_min` and `clip_ratio/high_max` -> the per
            sequence clip fractions `[B]` (NaN for a sequence without a loss token), of which TRL logs the min / max
            over all processes.
        policy_loss (`torch.Tensor`): the loss before the entropy bonus, as TRL logs it as `policy_loss` when the
            bonus is enabled (for grpo, bnpo, dr_grpo, sapo and luspo before the division by the accumulation steps).
        entropy_window (`torch.Tensor`): `(sum of H_t, count)` over the tokens of the entropy bonus, which adaptive
            entropy control adds to its window.
    """

    masked_means: dict[str, torch.Tensor] = field(default_factory=dict)
    sequence_values: dict[str, torch.Tensor] = field(default_factory=dict)
    policy_loss: torch.Tensor | None = None
    entropy_window: torch.Tensor | None = None

    def metrics(
        self,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """TRL's metric values. `reduce_sum` sums a tensor over processes and `gather` concatenates one
        (`accelerator.reduce(..., reduction="sum")` and `accelerator.gather`); by default a single process."""
        reduce_sum = reduce_sum or (lambda t: t)
        gather = gather or (lambda t: t)
        out = {}
        for name, pair in self.masked_means.items():
            totals = reduce_sum(pair)
            out[name] = (totals[0] / totals[1].clamp(min=1.0)).item()
        for name, values in self.sequence_values.items():
            gathered = gather(values)
            finite = gathered[~torch.isnan(gathered)]
            if finite.numel() == 0:
                out[name] = float("nan")
            else:
                out[name] = (finite.min() if name.endswith("_min") else finite.max()).item()
        return out


# ---------------------------------------------------------------------------------------- the loss, TRL's way


def _per_sequence(x: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-sequence input (`[B]` or `[B, 1]`) as `[B, 1]`; a per-token one (`[B, T]`) as it is."""
    return x.reshape(batch, 1) if x.dim() == 1 else x


def gamma_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_ratio: torch.Tensor | None,
    options: GRPOOptions,
) -> torch.Tensor:
    """VESPO's detached per-sequence weight `phi(w) = exp(lambda + k log w - lambda w)` (TRL's `get_gamma_weights`),
    `w` the sequence's importance weight `exp(sum_t m (lp - o) [+ sum_t log rho_t])`, clamped in log space."""
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if importance_sampling_ratio is not None:
            # over every position of the row, as TRL does (a position outside the completion must carry 1)
            log_w = log_w + torch.log(importance_sampling_ratio).clamp(VESPO_LOG_MIN, 20.0).sum(-1, keepdim=True)
        return _gamma_from_log_weight(advantages, log_w.clamp(VESPO_LOG_MIN, 20.0), options)


def _gamma_from_log_weight(advantages, log_w, options: GRPOOptions) -> torch.Tensor:
    # torch.where of two Python numbers gives default-dtype (float32) values, as in TRL: keep that rounding
    nonnegative = advantages >= 0
    k = torch.where(nonnegative, options.vespo_k_pos, options.vespo_k_neg)
    lam = torch.where(nonnegative, options.vespo_lambda_pos, options.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_objective(
    per_token_logps: torch.Tensor,
    entropies: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    num_items_in_batch=None,
    options: GRPOOptions = GRPOOptions(),
) -> tuple[torch.Tensor, GRPOStatistics]:
    """TRL's `_compute_loss` from the per-token log-probs and entropies on (all `[B, T]`; `advantages` `[B]` or
    `[B, T]`, `importance_sampling_ratio` `[B, T]` or `[B, 1]`). Returns `(loss, statistics)`."""
    o = options
    mask = mask.to(per_token_logps.dtype)
    batch = mask.shape[0]
    advantages = _per_sequence(advantages, batch)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps

    if o.off_policy_mask_threshold is not None:
        sampling = old if sampling_per_token_logps is None else sampling_per_token_logps
        kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
        mean_kl = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (mean_kl <= o.off_policy_mask_threshold)).to(mask.dtype)

    log_ratio = per_token_logps - old
    if o.sequence_level:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_weights = log_ratio
    coef_1 = torch.exp(log_weights)

    if o.beta != 0.0:
        delta_ref = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(delta_ref) - delta_ref - 1
        if o.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if o.loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=o.epsilon_upper).detach()
        per_token_loss = -clamped * advantages * per_token_logps
    elif o.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - o.epsilon_low, 1 + o.epsilon_upper)
        if o.delta is not None:
            coef_1 = torch.clamp(coef_1, max=o.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif o.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        per_token_loss = -(torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures) * advantages
    else:  # vespo
        phi = gamma_weights(advantages, log_ratio, mask, importance_sampling_ratio, o)
        per_token_loss = -phi * advantages * per_token_logps

    if o.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if importance_sampling_ratio is not None and o.loss_type != "vespo":
        per_token_loss = per_token_loss * _per_sequence(importance_sampling_ratio, batch)
    if o.beta != 0.0:
        per_token_loss = per_token_loss + o.beta * per_token_kl

    G = o.accumulation
    if o.loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        policy_loss, loss = loss.detach(), loss / G
    elif o.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        policy_loss, loss = loss.detach(), loss / G
    elif o.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * o.max_completion_length)
        policy_loss, loss = loss.detach(), loss / G
    elif o.loss_type in GENERATION_BATCH_LOSS_TYPES:
        loss = (per_token_loss * mask).sum() / generation_batch_normaliser(num_items_in_batch, mask, o)
        policy_loss = loss.detach()
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()
        policy_loss, loss = loss.detach(), loss / G

    if o.entropy_coef != 0.0:
        entropy_loss = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / G
        loss = loss - o.entropy_coef * entropy_loss

    # ---- what TRL logs
    with torch.no_grad():
        stats = GRPOStatistics(
            policy_loss=policy_loss, entropy_window=torch.stack([(entropies * mask).sum(), mask.sum()]).detach()
        )

        def masked_mean(x):
            if x.shape[1] == 1:  # one value per sequence
                return torch.stack([x.sum(), torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)])
            return torch.stack([(x * mask).sum(), mask.sum()])

        def sequence_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        if o.beta != 0.0:
            stats.masked_means["kl"] = masked_mean(per_token_kl.detach())
        stats.masked_means["entropy"] = masked_mean(entropies.detach())
        coef_1 = coef_1.detach()
        if o.loss_type in CLIPPED_LOSS_TYPES:
            low = ((coef_1 < 1 - o.epsilon_low) & (advantages < 0)).to(mask.dtype)
            high = ((coef_1 > 1 + o.epsilon_upper) & (advantages > 0)).to(mask.dtype)
            region = ((low > 0) | (high > 0)).to(mask.dtype)
            stats.masked_means["clip_ratio/low_mean"] = masked_mean(low)
            stats.masked_means["clip_ratio/high_mean"] = masked_mean(high)
            stats.masked_means["clip_ratio/region_mean"] = masked_mean(region)
            stats.sequence_values["clip_ratio/low_min"] = sequence_mean(low)
            stats.sequence_values["clip_ratio/high_max"] = sequence_mean(high)
        elif o.loss_type == "cispo":
            clipped = ((coef_1 > o.epsilon_upper) & (advantages > 0)).to(mask.dtype)
            stats.masked_means["cispo_clip_ratio"] = masked_mean(clipped)
        elif o.loss_type == "vespo":
            stats.masked_means["vespo/phi_seq_mean"] = masked_mean(phi)
    return loss, stats


def generation_batch_normaliser(num_items_in_batch, mask: torch.Tensor, options: GRPOOptions):
    """dapo / cispo / vespo's divisor: the generation batch's loss tokens over processes, scaled to one accumulation
    window in training (`max(N, 1) / P * G / steps_per_generation`); N defaults to this call's loss tokens."""
    if num_items_in_batch is None:
        count = mask.sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        count = num_items_in_batch.to(device=mask.device, dtype=mask.dtype)
    else:
        count = torch.tensor(float(num_items_in_batch), dtype=mask.dtype, device=mask.device)
    normaliser = count.clamp(min=1.0) / options.num_processes
    if options.training:
        normaliser = normaliser * options.gradient_accumulation_steps / options.steps_per_generation
    return normaliser


def _check_token_input(name: str, value, shape: tuple, per_sequence_ok: bool = False):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"`{name}` must be a tensor shaped like `labels` {shape}.")
    allowed = [shape]
    if per_sequence_ok:
        allowed += [(shape[0],), (shape[0], 1)] if len(shape) == 2 else [(1,), (1, 1)]
    if tuple(value.shape) not in allowed:
        what = "shaped like `labels`" + (" or one value per sequence ([B] or [B, 1])" if per_sequence_ok else "")
        raise ValueError(f"`{name}` has shape {tuple(value.shape)}; it must be {what}, `labels` being {shape}.")
    if value.is_complex() or not value.is_floating_point():
        raise ValueError(f"`{name}` must hold real numbers, got dtype {value.dtype}.")
    return value


def _check_inputs(labels, advantages, old_log_probs, ref_log_probs, importance_sampling_ratio, sampling_log_probs, o):
    shape = tuple(labels.shape)
    if advantages is None:
        raise ValueError("GRPO needs `advantages`: one per completion ([B]) or per token (shaped like `labels`).")
    advantages = _check_token_input("advantages", advantages, shape, per_sequence_ok=True)
    if o.beta != 0.0 and ref_log_probs is None:
        raise ValueError(
            f"`beta={o.beta}` needs `ref_log_probs`, the reference model's log-prob of every label (shaped like "
            "`labels`); with beta=0 no reference model is used."
        )
    return (
        advantages,
        _check_token_input("old_log_probs", old_log_probs, shape),
        _check_token_input("ref_log_probs", ref_log_probs, shape) if o.beta != 0.0 else None,
        _check_token_input("importance_sampling_ratio", importance_sampling_ratio, shape, per_sequence_ok=True),
        _check_token_input("sampling_log_probs", sampling_log_probs, shape),
    )


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A flat call's `[N]` labels or mask (one sequence) as one row `[1, N]`."""
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def _objective_inputs(mask: torch.Tensor, given: dict, dtype: torch.dtype) -> tuple:
    """`(advantages, old, ref, importance_sampling_ratio, sampling)` as `grpo_objective` takes them: `[B, T]` rows
    (a flat call is one row) in `dtype`. Positions outside the loss mask never enter the loss: per-token log-probs
    are zeroed there, so that whatever they hold (padding) the loss stays finite."""
    flat = mask.dim() == 1
    rows_mask = _as_rows(mask)

    def per_token(t):
        return None if t is None else (t.unsqueeze(0) if flat else t).to(dtype).masked_fill(~rows_mask, 0.0)

    def per_token_or_sequence(t):
        return None if t is None else (t.reshape(1, -1) if flat else t).to(dtype)

    return (
        per_token_or_sequence(given["advantages"]),
        per_token(given["old"]),
        per_token(given["ref"]),
        per_token_or_sequence(given["is_ratio"]),
        per_token(given["sampling"]),
    )


def grpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_log_probs: torch.Tensor | None = None,
    num_items_in_batch=None,
    return_statistics: bool = False,
    **options,
):
    """TRL 1.16's GRPO loss (`GRPOTrainer._compute_loss`) on materialised completion logits. Computed in float32 at
    least.

    Args:
        logits (`torch.Tensor` of shape `[B, T, V]`): the policy's logits, aligned with `labels`, before the
            temperature.
        labels (`torch.LongTensor` of shape `[B, T]`): the completion token ids, -100 where TRL's loss mask
            (`completion_mask * tool_mask`) is 0; with `mask_truncated_completions` a truncated completion is all
            -100 (it still counts in B for grpo, sapo, dr_grpo and luspo, as in TRL).
        advantages (`torch.Tensor` of shape `[B]` or `[B, T]`): one advantage per completion (or per token).
        old_log_probs (`torch.Tensor` of shape `[B, T]`, *optional*): the log-probs of the labels under the policy
            that generated them (TRL's `old_per_token_logps`); None when TRL skips them (on-policy: the ratio is
            `exp(lp - sg(lp))`, 1 in value).
        ref_log_probs (`torch.Tensor` of shape `[B, T]`, *optional*): the reference model's log-probs; needed when
            `beta != 0`.
        importance_sampling_ratio (`torch.Tensor` of shape `[B, T]` or `[B]`, *optional*): the vLLM importance
            sampling ratio (TRL's `inputs["importance_sampling_ratio"]`, given only with
            `vllm_importance_sampling_correction`); it multiplies the policy term, and for vespo enters the gamma
            weight instead (summed over every position, so positions outside the completion must hold 1).
        sampling_log_probs (`torch.Tensor` of shape `[B, T]`, *optional*): the sampler's log-probs, for the off-policy
            mask (default: `old_log_probs`).
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): for dapo, cispo and vespo, the loss tokens of the
            whole generation batch over all processes (TRL's `inputs["num_items_in_batch"]`); default: the loss
            tokens of this call.
        return_statistics (`bool`): also return a `GRPOStatistics` with what TRL logs.
        **options: the `GRPOOptions` fields: `GRPOConfig`'s `loss_type` (default "dapo"),
            `importance_sampling_level`, `beta`, `use_bias_correction_kl`, `epsilon`, `epsilon_high`, `delta`,
            `sapo_temperature_pos/neg`, `vespo_k_pos/lambda_pos/k_neg/lambda_neg`, `off_policy_mask_threshold`,
            `temperature`, `max_completion_length` (dr_grpo), `steps_per_generation`; the applied `entropy_coef`;
            and `num_processes`, `gradient_accumulation_steps`, `training`.

    Returns:
        The scalar loss, or `(loss, statistics)` with `return_statistics=True`.
    """
    o = grpo_options(options)
    if labels.dim() not in (1, 2) or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"`logits` {tuple(logits.shape)} and `labels` {tuple(labels.shape)} do not match: pass logits [B, T, V] "
            "with labels [B, T]."
        )
    advantages, old, ref, is_ratio, sampling = _check_inputs(
        labels, advantages, old_log_probs, ref_log_probs, importance_sampling_ratio, sampling_log_probs, o
    )
    mask = check_labels(labels, logits.shape[-1])
    rows_mask, rows_labels = _as_rows(mask), _as_rows(labels)
    rows_logits = logits.unsqueeze(0) if labels.dim() == 1 else logits
    log_probs = torch.log_softmax(rows_logits.to(compute_dtype(logits.dtype)) / o.temperature, dim=-1)
    lp = log_probs.gather(-1, rows_labels.masked_fill(~rows_mask, 0).unsqueeze(-1)).squeeze(-1)
    lp = lp.masked_fill(~rows_mask, 0.0)
    entropies = -(log_probs.exp() * log_probs).sum(-1).masked_fill(~rows_mask, 0.0)
    given = {"advantages": advantages, "old": old, "ref": ref, "is_ratio": is_ratio, "sampling": sampling}
    loss, stats = grpo_objective(
        lp,
        entropies,
        rows_mask,
        *_objective_inputs(mask, given, lp.dtype),
        num_items_in_batch=num_items_in_batch,
        options=o,
    )
    return (loss, stats) if return_statistics else loss


# ------------------------------------------------------------------------------------------ the fused head's rule


def _clip_terms(ratio, advantages, o: GRPOOptions):
    """The clipped objective's `l = -min(r~ A, clamp(r) A)` and `a = -dl/dlog r`, with torch's subgradients: a
    clamp passes the gradient on its closed interval and `min` splits a tie evenly (on-policy r = 1 is a tie)."""
    lower, upper = 1 - o.epsilon_low, 1 + o.epsilon_upper
    clipped = torch.clamp(ratio, lower, upper)
    capped = torch.clamp(ratio, max=o.delta) if o.delta is not None else ratio
    u, v = capped * advantages, clipped * advantages
    gate_u = (ratio <= o.delta).to(ratio.dtype) if o.delta is not None else torch.ones_like(ratio)
    gate_v = ((ratio >= lower) & (ratio <= upper)).to(ratio.dtype)
    gate = torch.where(u < v, gate_u, torch.where(u > v, gate_v, (gate_u + gate_v) / 2))
    return -torch.minimum(u, v), ratio * advantages * gate


def _sapo_terms(ratio, advantages, o: GRPOOptions):
    """SAPO's `l = -(4 / tau) sigmoid(tau (r - 1)) A` and `a = -dl/dlog r = 4 r sigma (1 - sigma) A`."""
    temperatures = torch.where(advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
    gate = torch.sigmoid(temperatures * (ratio - 1))
    return -(gate * 4 / temperatures) * advantages, 4 * ratio * gate * (1 - gate) * advantages


def _ratio_terms(ratio, advantages, o: GRPOOptions):
    return (_clip_terms if o.loss_type in CLIPPED_LOSS_TYPES else _sapo_terms)(ratio, advantages, o)


def _in_dtype(row_inputs: dict, dtype: torch.dtype) -> dict:
    """A tile's per-row inputs in its compute dtype (the sequence ids stay integers, the call context as it is)."""
    return {
        name: value if name == "sequence" or not isinstance(value, torch.Tensor) else value.to(dtype)
        for name, value in row_inputs.items()
    }


#: The key of `GRPOStatistics` in the metrics the head returns (`fused_linear_loss(..., return_metrics=True)`)
STATISTICS_METRIC = "grpo_statistics"


@dataclass
class _Call:
    """What one call of the head needs beyond its per-row tensors, held in `prepare`'s result (under "call") and
    handed to every tile as it is: the settings, the caller's inputs as given (for the statistics, which run TRL's
    formulas on `[B, T]` tensors), the rows per sequence, whether tiles hold whole sequences, and the per-row
    log-probs and entropies the tiles fill in."""

    options: GRPOOptions
    mask: torch.Tensor
    given: dict
    num_items: object
    counts: torch.Tensor
    num_rows: int
    deferred: bool = False
    label_log_probs: torch.Tensor | None = None
    entropies: torch.Tensor | None = None

    def keep(self, rows: slice, lp: torch.Tensor, entropy: torch.Tensor) -> None:
        if self.label_log_probs is None:
            self.label_log_probs = torch.zeros(self.num_rows, dtype=lp.dtype, device=lp.device)
            self.entropies = torch.zeros_like(self.label_log_probs)
        self.label_log_probs[rows] = lp.detach()
        self.entropies[rows] = entropy.detach()

    def statistics(self) -> GRPOStatistics:
        """What TRL logs for the call, from TRL's formulas on the per-row log-probs and entropies."""
        mask = self.mask
        lp, entropy = self.label_log_probs, self.entropies
        if lp is None:  # no supervised row: nothing ran
            lp = entropy = torch.zeros(0, dtype=torch.float64, device=mask.device)
        rows_mask = _as_rows(mask)
        full = torch.zeros(rows_mask.shape, dtype=lp.dtype, device=lp.device)
        lp_full = full.masked_scatter(rows_mask, lp)
        entropy_full = full.masked_scatter(rows_mask, entropy)
        with torch.no_grad():
            _, stats = grpo_objective(
                lp_full,
                entropy_full,
                rows_mask,
                *_objective_inputs(mask, self.given, lp.dtype),
                num_items_in_batch=self.num_items,
                options=self.options,
            )
        return stats


class GRPOMethod(LossMethod):
    """TRL's GRPO loss for the fused head: `w = c_t * one_hot(y_t)` with `c_t = -dL/dlp_t` formed in each row tile,
    the entropy bonus as the dense target `-kappa_t * p (log p + H_t)`, and per-row constants that make the value
    TRL's loss. `num_items_in_batch` is TRL's (dapo, cispo, vespo); every other normaliser is built in, so the head
    divides by nothing (`num_items` is 1).

    Inputs (the same names and meanings as `grpo_loss`): `advantages`, `old_log_probs`, `ref_log_probs`,
    `importance_sampling_ratio`, `sampling_log_probs` (shaped like `labels`; `advantages` and the importance ratio
    may be one value per sequence), `num_items_in_batch` and the `GRPOOptions` fields; the temperature divides the
    logits inside the head (`logit_scale`). Labels may span prompt and completion (`[B, P + C]`, -100 over the
    prompt): per-token inputs are then read at the completion's positions only, except VESPO's importance ratio,
    which TRL sums over every position (1 over the prompt adds nothing).

    The method keeps nothing between calls: what TRL logs comes back with the head's metrics
    (`fused_linear_loss(..., return_metrics=True)`), as a `GRPOStatistics` under `"grpo_statistics"`, computed from
    the per-row log-probs and entropies the tiles produced (no extra matmul).

    Whole-sequence quantities: the sequence-level ratio off-policy, VESPO's weight off-policy, the off-policy mask
    against sampler or old log-probs, and the sequence-level bias-corrected KL depend on every token of a sequence.
    The tiles then hold whole sequences (`tile_groups`), so each tile forms them first (three matmuls; on `triton`
    between the kernel's two launches); a completion longer than `SEQUENCE_TILE_BUDGET / V` rows takes a first
    no-grad pass of the head instead (`Rows.label_log_probs`: one more matmul per tile). On-policy they are exactly
    known without any pass (ratios 1).
    """

    name = "grpo"
    reduces_itself = True
    whole_sequence_kernel_tiles = True

    def prepare(
        self,
        rows: Rows,
        advantages: torch.Tensor | None = None,
        old_log_probs: torch.Tensor | None = None,
        ref_log_probs: torch.Tensor | None = None,
        importance_sampling_ratio: torch.Tensor | None = None,
        sampling_log_probs: torch.Tensor | None = None,
        num_items_in_batch=None,
        **options,
    ) -> dict[str, torch.Tensor]:
        o = grpo_options(options)
        self.logit_scale = 1.0 / o.temperature  # read by the head for this call (`LossMethod.logit_scale`)
        device = rows.labels.device
        mask = rows.mask.to(device)
        advantages, old, ref, is_ratio, sampling = _check_inputs(
            mask, advantages, old_log_probs, ref_log_probs, importance_sampling_ratio, sampling_log_probs, o
        )
        n_rows, num_sequences = rows.labels.numel(), rows.num_sequences
        f64 = torch.float64
        sequence = rows.sequence_index.to(device)
        counts = torch.zeros(num_sequences, dtype=f64, device=device).index_add(
            0, sequence, torch.ones(n_rows, dtype=f64, device=device)
        )
        given = {
            "advantages": advantages.detach().to(device),
            "old": None if old is None else old.detach().to(device),
            "ref": None if ref is None else ref.detach().to(device),
            "is_ratio": None if is_ratio is None else is_ratio.detach().to(device),
            "sampling": None if sampling is None else sampling.detach().to(device),
        }
        call = _Call(o, mask, given, num_items_in_batch, counts, n_rows)

        def per_row(name, tensor):
            if tensor is None:
                return None
            tensor = tensor.detach().to(device=device, dtype=f64)
            if tuple(tensor.shape) == tuple(mask.shape):
                return rows.gather(name, tensor)
            return tensor.reshape(-1)[sequence]  # one value per sequence

        inputs = {"call": call, "sequence": sequence, "advantages": per_row("advantages", advantages)}
        for name, tensor in (("old", old), ("ref", ref), ("sampling", sampling)):
            if tensor is not None:
                inputs[name] = per_row(name, tensor)
        if is_ratio is not None and o.loss_type != "vespo":
            inputs["is_ratio"] = per_row("importance_sampling_ratio", is_ratio)
        if is_ratio is not None and o.loss_type == "vespo":
            # VESPO adds the sampler correction to its log weight, summed over every position of the row as TRL does
            log_is = torch.log(is_ratio.detach().to(device=device, dtype=f64)).clamp(VESPO_LOG_MIN, 20.0)
            per_sequence_sum = log_is.reshape(num_sequences, -1).sum(-1)
            inputs["vespo_log_is"] = per_sequence_sum[sequence]
        inputs["row_scale"] = _row_scale(o, counts, sequence, n_rows, num_sequences, num_items_in_batch)
        if o.entropy_coef != 0.0:
            kappa = o.entropy_coef / (max(n_rows, 1) * o.accumulation)
            inputs["entropy_weight"] = torch.full((n_rows,), kappa, dtype=f64, device=device)

        on_policy = old is None
        uses_lp = (
            (o.sequence_level and not on_policy)
            or (o.loss_type == "vespo" and not on_policy)
            or (o.off_policy_mask_threshold is not None and not (on_policy and sampling is None))
            or (o.sequence_level and o.beta != 0.0 and o.use_bias_correction_kl)
        )
        needs_sequences = o.sequence_level or o.loss_type == "vespo" or o.off_policy_mask_threshold is not None
        if not needs_sequences:
            return inputs
        longest = int(counts.max()) if num_sequences else 0
        if uses_lp and rows.whole_sequence_tiles and longest * (rows.vocab_size or 1) <= SEQUENCE_TILE_BUDGET:
            call.deferred = True  # each tile holds whole sequences and forms their terms from its own log-probs
            return inputs
        # The terms now, for all rows: from a first no-grad pass when they depend on the log-probs, else exactly
        # (on-policy, every log-ratio is 0 and the log-probs never enter)
        lp = rows.label_log_probs().to(f64) if uses_lp else None
        inputs.update(_sequence_terms(o, lp, inputs, sequence, num_sequences))
        return inputs

    def _terms_of(self, lp: torch.Tensor, entropy: torch.Tensor, r: dict) -> tuple[torch.Tensor, torch.Tensor]:
        call = r["call"]
        if call.deferred:
            local, inverse = torch.unique_consecutive(r["sequence"], return_inverse=True)
            seen = torch.bincount(inverse, minlength=local.numel()).to(call.counts.dtype)
            if not torch.equal(seen, call.counts[local]):
                raise RuntimeError("GRPO: a tile split a sequence; the backend must honour `tile_groups`.")
            seq = _sequence_terms(call.options, lp, r, inverse, local.numel())
        else:
            seq = r
        return _row_terms(call.options, lp, entropy, r, seq)

    def targets(self, chunk: Chunk) -> Targets:
        dtype = chunk.log_probs.dtype
        lp = chunk.label_log_probs
        entropy = -torch.linalg.vecdot(chunk.probs, chunk.log_probs)
        r = _in_dtype(chunk.inputs, dtype)
        r["call"].keep(chunk.rows, lp, entropy)
        coefficient, loss = self._terms_of(lp, entropy, r)
        targets = Targets(index=chunk.labels.unsqueeze(-1), value=coefficient.unsqueeze(-1))
        constant = loss + coefficient * lp
        if "entropy_weight" in r:
            # dH/dz = -p (log p + H): the bonus -kappa H is the dense target -kappa p (log p + H), whose weights sum
            # to 0; its cross-entropy is kappa Var_p(log p), which the constant takes back out
            dense = chunk.log_probs + entropy.unsqueeze(-1)
            dense.mul_(chunk.probs).mul_(-r["entropy_weight"].unsqueeze(-1))
            constant = constant + torch.linalg.vecdot(dense, chunk.log_probs)
            targets.dense = dense
        targets.constant = constant
        return targets

    def num_items(self, rows: Rows, row_inputs: dict[str, torch.Tensor]) -> int:
        return 1

    def tile_groups(self, row_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return row_inputs["sequence"] if row_inputs["call"].deferred else None

    def kernel_spec(self, row_inputs: dict[str, torch.Tensor]) -> KernelSpec:
        call = row_inputs["call"]

        def row_targets(rows: slice, lp: torch.Tensor, entropy: torch.Tensor):
            call.keep(rows, lp, entropy)
            r = _in_dtype(
                {name: value[rows] if name != "call" else value for name, value in row_inputs.items()}, lp.dtype
            )
            coefficient, loss = self._terms_of(lp, entropy, r)
            return coefficient, r.get("entropy_weight"), loss

        return KernelSpec(row_targets=row_targets)

    def call_metrics(self, row_inputs: dict) -> dict:
        """What TRL logs for this call (`GRPOStatistics`), under `"grpo_statistics"`."""
        return {STATISTICS_METRIC: row_inputs["call"].statistics()}


def _row_scale(o: GRPOOptions, counts, sequence, n_rows, num_sequences, num_items_in_batch) -> torch.Tensor:
    """W_t, the loss type's normaliser of each row (with the accumulation steps G)."""
    f64, device = torch.float64, counts.device
    G, B = o.accumulation, max(num_sequences, 1)
    if o.loss_type in ("grpo", "sapo"):
        return 1.0 / (B * counts.clamp(min=1.0)[sequence] * G)
    if o.loss_type in GENERATION_BATCH_LOSS_TYPES:
        local = torch.ones(n_rows, dtype=f64, device=device)  # stands for the mask: its sum is the default N
        scale = 1.0 / generation_batch_normaliser(num_items_in_batch, local, o)
    elif o.loss_type == "bnpo":
        scale = 1.0 / (max(n_rows, 1) * G)
    elif o.loss_type == "dr_grpo":
        scale = 1.0 / (B * o.max_completion_length * G)
    else:  # luspo
        scale = 1.0 / (B * G)
    return torch.as_tensor(scale, dtype=f64, device=device).expand(n_rows).clone()


def _sequence_terms(o: GRPOOptions, lp, r, sequence, num_sequences) -> dict[str, torch.Tensor]:
    """Per-row values that depend on the row's whole sequence, for rows holding whole sequences (`sequence` indexes
    `num_sequences` sequences). `lp` None: on-policy, where every log-ratio is 0 and lp never enters."""
    advantages = r["advantages"]
    dtype = advantages.dtype
    counts = torch.zeros(num_sequences, dtype=dtype, device=advantages.device).index_add(
        0, sequence, torch.ones_like(advantages)
    )

    def sequence_sum(x):
        return torch.zeros_like(counts).index_add(0, sequence, x)

    def sequence_mean(x):
        return (sequence_sum(x) / counts.clamp(min=1.0))[sequence]

    zeros = torch.zeros_like(advantages)
    log_ratio = zeros if lp is None or "old" not in r else lp - r["old"]
    out = {}
    if o.off_policy_mask_threshold is not None:
        reference = r.get("sampling", r.get("old"))
        kl = zeros if reference is None else torch.nan_to_num(reference - lp, nan=0.0)
        out["off_policy_mask"] = ((advantages >= 0) | (sequence_mean(kl) <= o.off_policy_mask_threshold)).to(dtype)
    if o.sequence_level:
        out["sequence_ratio"] = torch.exp(sequence_mean(log_ratio))
    if o.loss_type == "vespo":
        log_w = sequence_sum(log_ratio.clamp(-20.0, 20.0))[sequence]
        if "vespo_log_is" in r:
            log_w = log_w + r["vespo_log_is"]
        out["vespo_weight"] = _gamma_from_log_weight(advantages, log_w.clamp(VESPO_LOG_MIN, 20.0), o)
    if o.sequence_level and o.loss_type not in ("cispo", "vespo"):
        # c_u = (1 / T_i) sum_t W_t M_t rho_t * s * (-dl_t/ds): the ratio's gradient spreads over the sequence
        _, slope = _ratio_terms(out["sequence_ratio"], advantages, o)
        d = r["row_scale"] * slope * _policy_factor(r, out)
        out["sequence_policy"] = sequence_mean(d)
    if o.sequence_level and o.beta != 0.0 and o.use_bias_correction_kl:
        q_minus = r["ref"] - lp
        k3 = torch.exp(q_minus) - q_minus - 1
        out["sequence_kl"] = sequence_mean(r["row_scale"] * k3 * out["sequence_ratio"])
    return out


def _policy_factor(r, seq) -> torch.Tensor | float:
    """M_t * rho_t: the off-policy mask and the vLLM importance ratio (not for vespo), both detached."""
    factor = 1.0
    if "off_policy_mask" in seq:
        factor = seq["off_policy_mask"]
    if "is_ratio" in r:
        factor = factor * r["is_ratio"]
    return factor


def _row_terms(o: GRPOOptions, lp: torch.Tensor, entropy: torch.Tensor, r, seq):
    """`(c, loss)` per row: the coefficient `-dL/dlp_t` and the row's exact share of TRL's loss."""
    A, W = r["advantages"], r["row_scale"]
    factor = _policy_factor(r, seq)
    ratio = torch.exp(lp - r["old"]) if "old" in r else torch.ones_like(lp)
    level_ratio = seq["sequence_ratio"] if o.sequence_level else ratio
    if o.loss_type == "cispo":
        coefficient = W * factor * torch.clamp(level_ratio, max=o.epsilon_upper) * A
        loss = -coefficient * lp
    elif o.loss_type == "vespo":
        coefficient = W * seq.get("off_policy_mask", 1.0) * seq["vespo_weight"] * A
        loss = -coefficient * lp
    else:
        policy, slope = _ratio_terms(level_ratio, A, o)
        loss = W * factor * policy
        coefficient = seq["sequence_policy"] if o.sequence_level else W * factor * slope
    if o.beta != 0.0:
        q_minus = r["ref"] - lp
        kl = torch.exp(q_minus) - q_minus - 1
        if o.use_bias_correction_kl:
            kl = kl * level_ratio
            if o.sequence_level:
                kl_slope = level_ratio * (1 - torch.exp(q_minus)) * W + seq["sequence_kl"]
            else:
                kl_slope = W * ratio * (lp - r["ref"])
        else:
            kl_slope = W * (1 - torch.exp(q_minus))
        loss = loss + o.beta * W * kl
        coefficient = coefficient - o.beta * kl_slope
    if "entropy_weight" in r:
        loss = loss - r["entropy_weight"] * entropy
    return coefficient, loss
