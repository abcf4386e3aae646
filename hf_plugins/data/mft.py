"""Masked Thought Fine-Tuning (MFT, arXiv 2403.02178): which input tokens of the response are masked, with what, and
how the masking rate grows over training.

The official code (ChangyuChen347/MaskedThought, `models/mask_policy_utils.py`) masks, in each sequence with `n`
response tokens (the positions whose label is not -100: the response, its final answer and EOS; never the prompt or
the padding), `k ~ Binomial(n, p)` positions drawn uniformly without replacement, and replaces each masked input id
by a uniformly random token of the vocabulary with probability `replace_rate`, else by the mask token (a new
`<mask>` token, or the pad token). The labels stay the original ids: the loss is SFT's on the corrupted inputs. The
rate follows `p_t = min(p_max, p_max * t / (r * T + 1))` over the optimizer steps (`trainer/Trainer/trainer_436.py`),
with `t` the global step, `T` the total steps and `r = 2/3`.

Every random number of a batch comes from one draw `torch.rand(B, T, 4)` of the caller's generator: per position the
Bernoulli trial that counts `k`, the key that ranks the positions, the random-token coin and the random token. On a
CPU generator consecutive draws concatenate, so a batch of four sequences of one length masks what four batches of
one do (gradient accumulation 4x1 equals 1x4).
"""

from __future__ import annotations

import math

import torch

from ..utils import get_logger


logger = get_logger(__name__)

IGNORE_INDEX = -100
#: The token the official code adds to the tokenizer for masked positions
MASK_TOKEN = "<mask>"
#: Official defaults: `max_mask_rate` (0.4, the GSM8K scripts; the MATH script uses 0.2), `mask_rate_warmup_ratio`
#: (2/3) and the GSM8K scripts' `replace_rate` (1.0: every masked position gets a random token)
DEFAULT_MASK_RATE = 0.4
DEFAULT_WARMUP_RATIO = 2 / 3
DEFAULT_REPLACE_RATE = 1.0
#: The mask-rate schedules: the main repository's linear ramp over the optimizer steps, or a fixed rate
SCHEDULES = ("linear", "constant")
#: What a masked position that is not given a random token gets
MASK_TOKENS = ("mask", "pad")


def check_mft_settings(mask_rate, mask_rate_schedule, mask_rate_warmup_ratio, replace_rate, mask_token) -> None:
    """A one-line `ValueError` naming the first bad MFT setting and its valid range."""
    if not _is_real(mask_rate) or not 0 <= mask_rate < 1:
        raise ValueError(
            f"`mask_rate={mask_rate!r}` must be in [0, 1): the (final) fraction of response tokens masked (0.4: the "
            "official GSM8K recipe, 0.2: MATH; 0 trains plain SFT)."
        )
    if mask_rate_schedule not in SCHEDULES:
        raise ValueError(
            f"`mask_rate_schedule={mask_rate_schedule!r}` must be one of {', '.join(map(repr, SCHEDULES))} ('linear': "
            "the official ramp over `mask_rate_warmup_ratio` of the steps; 'constant': `mask_rate` from the first step)."
        )
    if not _is_real(mask_rate_warmup_ratio) or not 0 < mask_rate_warmup_ratio <= 1:
        raise ValueError(
            f"`mask_rate_warmup_ratio={mask_rate_warmup_ratio!r}` must be in (0, 1]: the share of the training steps "
            "over which the mask rate ramps up to `mask_rate` (official: 2/3)."
        )
    if not _is_real(replace_rate) or not 0 <= replace_rate <= 1:
        raise ValueError(
            f"`replace_rate={replace_rate!r}` must be in [0, 1]: the probability that a masked position gets a random "
            "token instead of the mask token (1.0: the official GSM8K recipe; 0: always the mask token)."
        )
    if mask_token not in MASK_TOKENS:
        raise ValueError(
            f"`mask_token={mask_token!r}` must be one of {', '.join(map(repr, MASK_TOKENS))}: 'mask' adds a "
            f"`{MASK_TOKEN}` token (embedding rows set to the mean of the existing rows), 'pad' uses the pad token."
        )


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scheduled_mask_rate(step: int, max_steps: int, mask_rate: float, warmup_ratio: float = DEFAULT_WARMUP_RATIO):
    """The official schedule `min(p_max, p_max * t / (r * T + 1))` at optimizer step `t = step` (the number of steps
    already taken: 0 during the first step) of `T = max_steps`."""
    return min(mask_rate, mask_rate * step / (warmup_ratio * max_steps + 1))


def draw_mask_uniforms(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch's random numbers, `[B, T, 4]` uniforms in [0, 1) on the labels' device (see the module docstring)."""
    return torch.rand((*labels.shape, 4), generator=generator, device=labels.device)


def sample_masked_positions(labels: torch.Tensor, mask_rate: float, uniforms: torch.Tensor) -> torch.Tensor:
    """`[B, T]` bool: per sequence, `k ~ Binomial(n, mask_rate)` of its `n` response positions (`labels != -100`),
    chosen uniformly without replacement.

    `k` counts the Bernoulli trials `uniforms[..., 0] < mask_rate` over the response positions (the official code's
    count); the chosen positions are the `k` response positions of smallest key `uniforms[..., 1]`, which is a uniform
    draw without replacement."""
    response = labels != IGNORE_INDEX
    counts = ((uniforms[..., 0] < mask_rate) & response).sum(dim=-1, keepdim=True)
    # keys of the other positions above every response key, so that they rank last and are never among the k first
    keys = torch.where(response, uniforms[..., 1], 2.0)
    ranks = keys.argsort(dim=-1).argsort(dim=-1)
    return (ranks < counts) & response


def mask_response_tokens(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    mask_rate: float,
    *,
    generator: torch.Generator | None = None,
    mask_token_id: int | None,
    replace_rate: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MFT's corrupted inputs: a copy of `input_ids` whose masked response positions (`sample_masked_positions`) hold
    a uniformly random token of `[0, vocab_size)` with probability `replace_rate`, else `mask_token_id`. Returns the
    new ids and the `[B, T]` bool mask of the masked positions; `input_ids` and `labels` are left as they are.

    `labels` are aligned with `input_ids` (as transformers' models take them, shifted inside the loss), so a masked
    position is a response token the model reads as its input, while the loss still predicts every original token."""
    if mask_token_id is None and replace_rate < 1:
        raise ValueError("`mask_token_id` is needed unless `replace_rate=1` (every masked position a random token).")
    uniforms = draw_mask_uniforms(labels, generator)
    masked = sample_masked_positions(labels, mask_rate, uniforms)
    random_tokens = (uniforms[..., 3] * vocab_size).long().clamp_(max=vocab_size - 1)
    if replace_rate >= 1:
        replacement = random_tokens
    else:
        replacement = torch.where(uniforms[..., 2] < replace_rate, random_tokens, mask_token_id)
    return torch.where(masked, replacement.to(input_ids.dtype), input_ids), masked


def add_mask_token(model, tokenizer, token: str = MASK_TOKEN) -> int:
    """Add `token` to `tokenizer` (when it does not have it) and give it input and output embedding rows equal to
    the mean of the rows of the tokenizer's other tokens, resizing the model's embeddings when the new id has no row.
    Returns its id. A token the tokenizer already has is left as it is (its rows are the model's own).

    The official code (`main.py`'s `resize`) averages the rows before resizing; this does the same over the ids the
    tokenizer had, so rows a model pads its vocabulary with (ids no token uses) do not enter the mean."""
    existing = tokenizer.convert_tokens_to_ids(token)
    if existing is not None and existing != tokenizer.unk_token_id:
        return existing
    used_rows = len(tokenizer)
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    embeddings = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embeddings[0].weight:
        embeddings.append(output)
    means = [layer.weight.detach()[:used_rows].float().mean(dim=0) for layer in embeddings]
    if token_id >= embeddings[0].weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = [model.get_input_embeddings()]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not embeddings[0].weight:
            embeddings.append(output)
    with torch.no_grad():
        for layer, mean in zip(embeddings, means, strict=True):
            layer.weight[token_id] = mean.to(layer.weight.dtype)
    logger.info(
        f"Added the MFT mask token {token!r} (id {token_id}), its embedding rows the mean of {used_rows} rows."
    )
    return token_id
