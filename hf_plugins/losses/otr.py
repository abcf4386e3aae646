"""OTR (One-Token Rollout, arXiv 2509.26313): every supervised position is a one-step RL episode.

At position t with label y_t, K tokens are drawn from the tempered policy `softmax(z_t / tau)` (detached), each is
rewarded `R(a, y) = 1` if it is the label and `beta` (`negative_reward`) otherwise, and the REINFORCE surrogate with
the *untempered* log-probability is minimised:

    l_t = -(1/K) sum_k R(a_k, y_t) * log softmax(z_t)[a_k]       i.e.  w[t] = (1/K) sum_k R(a_k, y_t) * one_hot(a_k)

`num_samples=None` gives the K -> infinity limit (ours, not the paper's), a dense soft target without sampling noise:
`w[t, v] = softmax(z_t / tau)[v] * R(v, y_t)`. At tau = 1 its gradient is (1 - beta) times DFT's.

Sampling is inverse-CDF: the uniforms `u [N, K]` of a call are drawn once, in row-major order over the supervised
positions, and each row's samples are `searchsorted(cumsum(softmax(z / tau)), u * total)` (searched block by block,
see `sample_tokens`). The samples are thus a pure function of (logits, u): the functional loss, every backend of the
fused head and any recomputation of a tile draw exactly the same tokens for the same generator state, and a row costs
O(V + K log V), never [N, V] at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.method import Chunk, KernelSpec, KernelStats, LossMethod, Rows, Targets
from ..utils import is_integer, is_real
from ._common import check_labels, compute_dtype, reduce_sum


DEFAULT_NUM_SAMPLES = 8
DEFAULT_TEMPERATURE = 1.2
DEFAULT_NEGATIVE_REWARD = -0.1
#: Tokens per block of the sampler's two-level search (`sample_tokens`): the in-block scan covers K blocks of this
#: size instead of the whole vocabulary, and the block sums are a short row
SAMPLING_BLOCK = 128


# ------------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class OTRSettings:
    """The hyperparameters of one OTR loss call, validated."""

    num_samples: int | None = DEFAULT_NUM_SAMPLES
    temperature: float = DEFAULT_TEMPERATURE
    negative_reward: float = DEFAULT_NEGATIVE_REWARD

    def __post_init__(self):
        check_otr_settings(self.num_samples, self.temperature, self.negative_reward)


def check_otr_settings(num_samples, temperature, negative_reward) -> None:
    """Raise a `ValueError` naming the field unless the OTR hyperparameters make sense."""
    if num_samples is not None and (not is_integer(num_samples) or num_samples < 1):
        raise ValueError(
            f"`num_samples` must be a positive integer (tokens sampled per position) or None for the exact "
            f"expectation, got {num_samples!r}."
        )
    if not is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"`temperature` must be a finite number > 0 (the paper samples at tau > 1; default "
            f"{DEFAULT_TEMPERATURE}), got {temperature!r}."
        )
    if not is_real(negative_reward) or not math.isfinite(negative_reward):
        raise ValueError(f"`negative_reward` must be a finite number < 1, got {negative_reward!r}.")
    if negative_reward >= 1:
        raise ValueError(
            f"`negative_reward={negative_reward}` must be < 1: the ground-truth token is rewarded 1, so a wrong token "
            f"rewarded as much or more would teach the model nothing or the opposite (default "
            f"{DEFAULT_NEGATIVE_REWARD})."
        )


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a `torch.Generator` or None, got {type(generator).__name__}.")


# ------------------------------------------------------------------------------------------------------ sampling


def draw_uniforms(num_rows: int, num_samples: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The `[num_rows, num_samples]` uniforms of one call, drawn on the generator's device and moved to `device`.

    Drawn in float32 whatever the compute dtype, so that the stream a generator produces does not depend on the
    precision of the logits. On CPU, two consecutive draws of n and m rows equal one draw of n + m rows, which is why
    gradient accumulation over micro-batches sees the same samples as one large batch.
    """
    source = generator.device if generator is not None else device
    uniforms = torch.rand(num_rows, num_samples, generator=generator, device=source, dtype=torch.float32)
    return uniforms.to(device)


def tempered_probs(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """`softmax(z / tau)` from `log softmax(z)` (the log-normaliser is a constant shift that softmax removes)."""
    return torch.softmax(log_probs / temperature, dim=-1)


def sample_tokens(
    log_probs: torch.Tensor, uniforms: torch.Tensor, temperature: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse-CDF samples from `softmax(log_probs / temperature)`, one row per row of `log_probs`.

    Args:
        log_probs (`torch.Tensor` of shape `[C, V]`): detached log-probabilities of the rows (not logits: at
            tau >= 1 they are exponentiated unshifted).
        uniforms (`torch.Tensor` of shape `[C, K]`): uniforms in [0, 1).
        temperature (`float`): the sampling temperature.
        out (`torch.Tensor` of shape `[C, V]`, *optional*): a tile to build the tempered masses in (overwritten);
            by default one is allocated.

    Returns:
        `torch.LongTensor` of shape `[C, K]`: token ids.

    The search has two levels, as the triton kernel's: the masses are summed per block of `SAMPLING_BLOCK` tokens, a
    point first finds its block among the blocks' running sums, then its token in the running sum of that block
    alone. A running sum over the whole tile (a sequential scan, the slowest pass of an OTR tile on CPU) is thus
    only taken over the K blocks hit.
    """
    rows, vocab = log_probs.shape
    num_samples = uniforms.shape[-1]
    masses = torch.empty_like(log_probs) if out is None else out
    inverse = 1.0 / temperature
    if temperature < 1:
        # the scaled log-probs of a peaked row underflow at tau < 1: shift them by the row max (`add` with `alpha`
        # scales and shifts in one pass)
        torch.add(log_probs.amax(dim=-1, keepdim=True).mul_(-inverse), log_probs, alpha=inverse, out=masses)
    else:
        # log p / tau <= 0, and >= log(1 / V) / tau >= log(1 / V) for the likeliest token (its p >= 1 / V): the row's
        # mass neither overflows nor underflows without the shift, which saves two passes over the tile
        torch.mul(log_probs, inverse, out=masses)
    masses.exp_()

    # the K blocks a row searches hold no more tokens than the row itself (many samples: smaller blocks)
    block = max(1, min(SAMPLING_BLOCK, vocab // max(num_samples, 1)))
    full = vocab // block
    block_sums = masses[:, : full * block].view(rows, full, block).sum(-1)
    if full * block < vocab:  # a last, shorter block
        block_sums = torch.cat([block_sums, masses[:, full * block :].sum(-1, keepdim=True)], dim=-1)
    block_cdf = block_sums.cumsum_(-1)  # unnormalised: the last column is the row's total mass
    # Scaling u by the total instead of normalising the CDF keeps every token's interval exactly its own mass, so a
    # token of probability 0 (an empty interval) is never drawn. With u <= 1 - 2^-24, u * total rounds strictly below
    # total, so every point lands in a block whose running sum grew past the previous block's: one of positive mass.
    # The clamps only keep a row of NaN logits (whose search runs past the end) from indexing out of the vocabulary.
    points = uniforms.to(masses.dtype) * block_cdf[:, -1:]
    block_index = torch.searchsorted(block_cdf, points, right=True).clamp_(max=block_cdf.shape[-1] - 1)
    before = torch.nn.functional.pad(block_cdf, (1, 0))[:, :-1].gather(1, block_index)  # mass of the earlier blocks
    tokens = block_index.unsqueeze(-1) * block + torch.arange(block, device=log_probs.device)  # [C, K, block]
    flat = tokens.view(rows, num_samples * block).clamp(max=vocab - 1)
    local = masses.gather(1, flat).view(rows, num_samples, block)
    local_cdf = local.masked_fill_(tokens >= vocab, 0.0).cumsum_(-1)
    # The point's offset into its block (>= 0: `before` <= point), kept below the block's own total, which rounds
    # differently from its entry in `block_cdf`: the first token whose running sum passes it is then in the block and
    # has positive mass (its running sum grew there)
    below_total = torch.nextafter(local_cdf[..., -1], torch.zeros((), dtype=masses.dtype, device=masses.device))
    offset = torch.minimum(points - before, below_total)
    within = torch.searchsorted(local_cdf, offset.unsqueeze(-1), right=True).squeeze(-1)
    return torch.gather(tokens, 2, within.clamp_(max=block - 1).unsqueeze(-1)).squeeze(-1).clamp_(max=vocab - 1)


def sample_rewards(samples: torch.Tensor, labels: torch.Tensor, negative_reward: float, dtype) -> torch.Tensor:
    """`R(a, y)`: 1 where a sample is the label, `negative_reward` elsewhere (`[C, K]`)."""
    rewards = torch.full(samples.shape, negative_reward, dtype=dtype, device=samples.device)
    return rewards.masked_fill_(samples == labels.unsqueeze(-1), 1.0)


# ---------------------------------------------------------------------------------------------- functional loss


def otr_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int | None = DEFAULT_NUM_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    negative_reward: float = DEFAULT_NEGATIVE_REWARD,
    generator: torch.Generator | None = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """The OTR surrogate loss on materialised logits, reduced like `sft_loss`.

    Args:
        logits (`torch.Tensor` of shape `[B, T, V]` or `[N, V]`): aligned with `labels`.
        labels (`torch.LongTensor` of shape `[B, T]` or `[N]`): token ids, -100 where no loss is taken.
        num_samples (`int` or `None`, *optional*, defaults to `8`): K, tokens sampled per supervised position.
            `None`: the exact expectation over the tempered policy (no sampling).
        temperature (`float`, *optional*, defaults to `1.2`): tau of the sampling policy `softmax(z / tau)`.
        negative_reward (`float`, *optional*, defaults to `-0.1`): beta, the reward of a sampled token that is not
            the label (< 1).
        generator (`torch.Generator`, *optional*): source of the uniforms (one `[N, K]` draw per call, in row-major
            order over the supervised positions); the global RNG when None. `fused_linear_loss(..., "otr")` with a
            generator in the same state draws the same samples.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this count.
    """
    check_otr_settings(num_samples, temperature, negative_reward)
    check_generator(generator)
    mask = check_labels(labels, logits.shape[-1])
    log_probs = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)[mask]  # [N, V], row-major
    targets = labels[mask]
    detached = log_probs.detach()

    if num_samples is None:
        # w[v] = softmax(z / tau)[v] * R(v, y), written out densely
        rewards = torch.full_like(detached, negative_reward)
        rewards.scatter_(1, targets.unsqueeze(-1), 1.0)
        weights = tempered_probs(detached, temperature) * rewards
        per_row = -(weights * log_probs).sum(-1)
    else:
        uniforms = draw_uniforms(targets.numel(), num_samples, generator, logits.device)
        samples = sample_tokens(detached, uniforms, temperature)
        rewards = sample_rewards(samples, targets, negative_reward, log_probs.dtype)
        per_row = -(rewards * log_probs.gather(1, samples)).mean(-1)
    return reduce_sum(per_row.sum(), targets.numel(), num_items_in_batch)


# -------------------------------------------------------------------------------------------- fused-head method

_UNSET = object()


class OTRMethod(LossMethod):
    """Target rule of OTR for the fused head.

    Inputs (keyword arguments of `fused_linear_loss`, each overriding the constructor's value for that call):
    `num_samples`, `temperature`, `negative_reward`, `generator`. The constructor's values are the method's
    configuration; a call's own settings live in `prepare`'s result (`"settings"`), with the uniforms, drawn once per
    call over the supervised rows in order and handed to each tile with its rows; a tile computed twice samples the
    same tokens again.

    Metrics: `hit_rate` (mean fraction of samples equal to the label; its expectation `softmax(z / tau)[y]` in exact
    mode) and `no_hit_fraction` (positions whose K samples all miss the label; sampling mode only).
    """

    name = "otr"

    def __init__(
        self,
        num_samples: int | None = DEFAULT_NUM_SAMPLES,
        temperature: float = DEFAULT_TEMPERATURE,
        negative_reward: float = DEFAULT_NEGATIVE_REWARD,
        generator: torch.Generator | None = None,
    ):
        check_generator(generator)
        self.defaults = OTRSettings(num_samples, temperature, negative_reward)
        self.generator = generator

    def prepare(
        self,
        rows: Rows,
        *,
        num_samples=_UNSET,
        temperature=_UNSET,
        negative_reward=_UNSET,
        generator=_UNSET,
    ) -> dict[str, Any]:
        def pick(value, default):
            return default if value is _UNSET else value

        settings = OTRSettings(
            pick(num_samples, self.defaults.num_samples),
            pick(temperature, self.defaults.temperature),
            pick(negative_reward, self.defaults.negative_reward),
        )
        generator = pick(generator, self.generator)
        check_generator(generator)
        if settings.num_samples is None:
            return {"settings": settings}
        uniforms = draw_uniforms(rows.labels.numel(), settings.num_samples, generator, rows.labels.device)
        return {"settings": settings, "uniforms": uniforms}

    def targets(self, chunk: Chunk) -> Targets:
        settings = chunk.inputs["settings"]
        beta, labels = settings.negative_reward, chunk.labels.unsqueeze(-1)
        if settings.num_samples is None:
            # softmax(z/tau) * R = beta * softmax(z/tau) + (1 - beta) * softmax(z/tau)[y] * one_hot(y): a dense part
            # (skipped when beta = 0, which saves the tile) and one sparse entry on the label
            tempered = tempered_probs(chunk.log_probs, settings.temperature)
            label_weight = (1.0 - beta) * tempered.gather(1, labels)
            dense = tempered.mul_(beta) if beta != 0 else None
            return Targets(index=labels, value=label_weight, dense=dense)
        # the masses go to a tile the backend reuses across chunks: no fresh [C, V] allocation per chunk
        samples = sample_tokens(chunk.log_probs, chunk.inputs["uniforms"], settings.temperature, out=chunk.tile(0))
        rewards = sample_rewards(samples, chunk.labels, beta, chunk.log_probs.dtype)
        return Targets(index=samples, value=rewards / settings.num_samples)

    def metrics(self, chunk: Chunk, targets: Targets) -> dict[str, torch.Tensor]:
        settings = chunk.inputs["settings"]
        if settings.num_samples is None:
            # the label's entry is (1 - beta) * softmax(z/tau)[y], and beta < 1: recover the expected hit rate
            return {"hit_rate": targets.value.squeeze(-1) / (1.0 - settings.negative_reward)}
        hits = targets.index == chunk.labels.unsqueeze(-1)
        dtype = chunk.log_probs.dtype
        return {"hit_rate": hits.to(dtype).mean(-1), "no_hit_fraction": (~hits.any(-1)).to(dtype)}

    def kernel_spec(self, row_inputs) -> KernelSpec:
        settings = row_inputs["settings"]
        if settings.num_samples is None:
            return KernelSpec(
                tempered_dense=True, temperature=settings.temperature, miss_reward=settings.negative_reward
            )
        return KernelSpec(
            label_target=False,
            temperature=settings.temperature,
            miss_reward=settings.negative_reward,
            num_samples=settings.num_samples,
            uniforms=row_inputs["uniforms"],
        )

    def kernel_metrics(self, stats: KernelStats, row_inputs) -> dict[str, torch.Tensor]:
        settings = row_inputs["settings"]
        if settings.num_samples is None:
            return {"hit_rate": stats.aux}
        hits = stats.aux
        return {"hit_rate": hits / settings.num_samples, "no_hit_fraction": (hits == 0).to(hits.dtype)}
