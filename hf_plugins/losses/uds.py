"""The scoring math of UDS (Utility-Diversity Sampling, arXiv 2510.16882), computed from hidden states.

From each candidate micro-batch of B examples UDS keeps the K with the largest

    score_i = ||L_i||_*  +  alpha * mean_{q in Q} ||z_i - q||_2

where `L_i` [N, V] are example i's logits over the padded batch length, `||.||_*` the nuclear norm (utility and
intra-sample diversity), `z_i` a fixed random bilinear sketch of `L_i` (r1 x r2 entries) and `Q` a FIFO memory of the
sketches of previously selected examples (inter-sample diversity).

The reference computation materialises `L_i`. Here neither score ever builds logits, because `L_i = H_i W^T (+ b)`
is linear in the final hidden states `H_i` [N, D]:

- nuclear norm: `L L^T = H M H^T` with `M = W^T W` [D, D]. With `M = F F^T` (Cholesky), the singular values of `L`
  are those of `A = H F` [N, D], read off the smaller of the Gram matrices `A A^T` / `A^T A` (float64 `eigvalsh`).
- sketch: `z = sqrt(T/r1) sqrt(V/r2) * P (H Omega)` with `Omega = W^T diag(d2) C_V[:, idx2]` [D, r2] and the small
  time transform `P = (C_T diag(d1))[idx1, :N]` [r1, N]; `C` are cosine (real DFT) matrices.

`F` and `Omega` depend on the lm_head only (`head_factors`): the callback computes them once per optimizer step (once
per run when the head is frozen, e.g. under LoRA). A bias is folded in exactly by appending a constant 1 to the hidden
states (a column of ones, zero on masked rows). A model that scales its logits (`s * L`: Cohere, Granite, ...) scales
the nuclear norm by `|s|` and the sketch by `s`; a soft-capped head (`c * tanh(s * L / c)`) is not linear in `H`, so it
is scored from logit tiles of a vocabulary chunk at a time instead (exact, never a `[B, N, V]` tensor).

This module holds the readable definitions on materialised logits (`nuclear_norms_from_logits`,
`sketches_from_logits`: the reference computation) and the hidden-state scorer. The state UDS keeps between steps
(the sketch constants of the run, the memory, the random streams) is `hf_plugins.callbacks.UDSCallback`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


# Elements per tile when a computation streams over the vocabulary (lm_head rows, soft-capped logits)
_TILE_ELEMENTS = 2**22


# ------------------------------------------------------------------------------------------------ sketch constants


def _cosines(positions: torch.Tensor, frequencies: torch.Tensor, period: int) -> torch.Tensor:
    """`cos(2 pi p f / period)` [len(positions), len(frequencies)] in float64, with the phase reduced modulo the period
    in integers first (as a DFT's twiddle factors are), so large `p * f` lose no precision."""
    phase = torch.remainder(positions.long()[:, None] * frequencies.long()[None, :], period).to(torch.float64)
    return torch.cos(phase * (2.0 * math.pi / period))


@dataclass
class SketchConstants:
    """The fixed random projection of the UDS sketch (a subsampled randomised real Fourier transform on both sides).

    Attributes:
        d1 (`torch.Tensor`): `[T]` random signs of the time side.
        d2 (`torch.Tensor`): `[V]` random signs of the vocabulary side.
        idx1 (`torch.Tensor`): `[r1]` time frequencies, drawn uniformly from `[0, T)` with replacement.
        idx2 (`torch.Tensor`): `[r2]` vocabulary frequencies, drawn uniformly from `[0, V)` with replacement.
    """

    d1: torch.Tensor
    d2: torch.Tensor
    idx1: torch.Tensor
    idx2: torch.Tensor

    @classmethod
    def draw(cls, length: int, vocab_size: int, rows: int, cols: int, generator: torch.Generator) -> SketchConstants:
        """Draw the constants for sequences of up to `length` (T) tokens, `vocab_size` (V) logits, an `rows` x `cols`
        (r1 x r2) sketch; in the reference's order (d2, idx2, d1, idx1)."""
        d2 = torch.randint(0, 2, (vocab_size,), generator=generator, dtype=torch.int8) * 2 - 1
        idx2 = torch.randint(0, vocab_size, (cols,), generator=generator)
        d1 = torch.randint(0, 2, (length,), generator=generator, dtype=torch.int8) * 2 - 1
        idx1 = torch.randint(0, length, (rows,), generator=generator)
        return cls(d1=d1, d2=d2, idx1=idx1, idx2=idx2)

    @property
    def length(self) -> int:
        return self.d1.numel()

    @property
    def vocab_size(self) -> int:
        return self.d2.numel()

    @property
    def rows(self) -> int:
        return self.idx1.numel()

    @property
    def cols(self) -> int:
        return self.idx2.numel()

    def to(self, device) -> SketchConstants:
        return SketchConstants(*(getattr(self, f.name).to(device) for f in fields(self)))

    def time_transform(self, n: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        """`sqrt(T / r1) * (C_T diag(d1))[idx1, :n]`, `[r1, n]`: the left factor, restricted to the first n rows
        (the rows after n are the zero padding up to T)."""
        t = torch.arange(n, device=self.idx1.device)
        transform = _cosines(self.idx1, t, self.length) * self.d1[:n].to(torch.float64)
        return (transform * math.sqrt(self.length / self.rows)).to(dtype=dtype, device=device)

    def vocab_transform(self, start: int, stop: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        """`sqrt(V / r2) * (diag(d2) C_V)[start:stop, idx2]`, `[stop - start, r2]`: rows of the right factor."""
        v = torch.arange(start, stop, device=self.idx2.device)
        transform = _cosines(v, self.idx2, self.vocab_size) * self.d2[start:stop, None].to(torch.float64)
        return (transform * math.sqrt(self.vocab_size / self.cols)).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------- the reference, on materialised logits


def nuclear_norms_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Utility of each example as the reference computes it: `svdvals(L_i).sum()` for logits `[B, N, V]`; `[B]`."""
    return torch.linalg.svdvals(logits).sum(-1)


def sketches_from_logits(logits: torch.Tensor, constants: SketchConstants) -> torch.Tensor:
    """Sketch of each example as the reference computes it, with FFTs over materialised logits `[B, N, V]`: zero-pad
    to T rows, flip signs with d2, keep the real DFT at idx2 along the vocabulary (times sqrt(V / r2)), flip signs
    with d1, keep the real DFT at idx1 along time (times sqrt(T / r1)). Returns `[B, r1 * r2]` (row-major r1 x r2)."""
    batch, n, vocab = logits.shape
    T = constants.length
    if vocab != constants.vocab_size:
        raise ValueError(f"The logits have {vocab} columns but the sketch was drawn for V={constants.vocab_size}.")
    if n > T:
        raise ValueError(f"The logits have {n} rows, more than the sketch length T={T}.")
    x = logits.new_zeros(batch, T, vocab)
    x[:, :n] = logits
    x = x * constants.d2.to(device=x.device, dtype=x.dtype)
    x = torch.fft.fft(x, dim=-1).real[..., constants.idx2.to(x.device)] * math.sqrt(vocab / constants.cols)
    x = x * constants.d1.to(device=x.device, dtype=x.dtype).view(1, T, 1)
    x = torch.fft.fft(x, dim=1).real[:, constants.idx1.to(x.device), :] * math.sqrt(T / constants.rows)
    return x.reshape(batch, -1)


# ----------------------------------------------------------------------------------------- the hidden-state scorer


@dataclass
class HeadFactors:
    """What the hidden-state scorer needs from the lm_head, computed once per head value.

    Attributes:
        factor (`torch.Tensor`): `[D', D']` with `factor @ factor.T == W'^T W'`, `W' = [W, b]` (D' = D + 1 with a
            bias).
        projection (`torch.Tensor`): `[D', r2]`, `W'^T (sqrt(V / r2) diag(d2) C_V[:, idx2])`.
        has_bias (`bool`): whether the last row of both stands for the bias (a constant-1 hidden coordinate).
    """

    factor: torch.Tensor
    projection: torch.Tensor
    has_bias: bool


def _vocab_tiles(vocab: int, width: int):
    step = max(1, _TILE_ELEMENTS // max(1, width))
    for start in range(0, vocab, step):
        yield start, min(vocab, start + step)


@torch.no_grad()
def head_factors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    constants: SketchConstants,
    dtype: torch.dtype = torch.float32,
    vocab_transform: torch.Tensor | None = None,
) -> HeadFactors:
    """`HeadFactors` for the lm_head `weight` [V, D] (and `bias` [V]), streaming over the vocabulary in tiles so that
    no float copy of the whole head is made. `M` is accumulated in `dtype`, factored in float64. `vocab_transform`:
    the whole `constants.vocab_transform(0, V)` in `dtype` if the caller keeps it (else built tile by tile)."""
    vocab, hidden_size = weight.shape
    if vocab != constants.vocab_size:
        raise ValueError(f"The lm_head has {vocab} rows but the sketch was drawn for V={constants.vocab_size}.")
    width = hidden_size + (bias is not None)
    device = weight.device
    gram = torch.zeros(width, width, dtype=dtype, device=device)
    projection = torch.zeros(width, constants.cols, dtype=dtype, device=device)
    for start, stop in _vocab_tiles(vocab, width):
        tile = weight[start:stop].to(dtype)
        if bias is not None:
            tile = torch.cat([tile, bias[start:stop, None].to(dtype)], dim=1)
        gram += tile.T @ tile
        if vocab_transform is not None:
            transform = vocab_transform[start:stop]
        else:
            transform = constants.vocab_transform(start, stop, dtype, device)
        projection += tile.T @ transform
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2
    factor, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        # W'^T W' is singular (fewer independent vocabulary rows than dimensions): any factor with F F^T = M will do
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        factor = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    return HeadFactors(factor=factor.to(dtype), projection=projection, has_bias=bias is not None)


def score_rows(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mask_padding: bool):
    """The rows each example is scored on: `(hidden, row_mask)`.

    With `mask_padding`, the rows of padding positions are dropped and the remaining rows moved to the front, in
    order (the example is scored as if it had been alone in its batch, whatever the padding side and length);
    `row_mask` [B, N] marks the rows that remain. Without it, every row of the padded batch counts (the reference's
    behaviour) and `row_mask` is all ones."""
    batch, n = hidden.shape[:2]
    if not mask_padding or attention_mask is None:
        return hidden, torch.ones(batch, n, dtype=hidden.dtype, device=hidden.device)
    keep = attention_mask.to(hidden.device).bool()
    # A stable sort of "is padding" brings the kept rows to the front in their order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    kept = torch.gather(keep, 1, order).to(hidden.dtype)
    hidden = torch.gather(hidden, 1, order[..., None].expand_as(hidden)) * kept[..., None]
    return hidden, kept


def _nuclear_norms(a: torch.Tensor) -> torch.Tensor:
    """Sum of the singular values of each `a` [B, N, D'] from the smaller Gram matrix, in float64."""
    a = a.to(torch.float64)
    gram = a @ a.mT if a.shape[1] <= a.shape[2] else a.mT @ a
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(-1)


@torch.no_grad()
def scores_from_hidden(
    hidden: torch.Tensor,
    factors: HeadFactors,
    constants: SketchConstants,
    attention_mask: torch.Tensor | None = None,
    mask_padding: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Utility `[B]` (float64) and sketch `[B, r1 * r2]` of each example from its final hidden states `[B, N, D]`,
    equal to `nuclear_norms_from_logits` / `sketches_from_logits` on `hidden @ W.T + b` (with padding rows removed
    and the rest moved to the front under `mask_padding`)."""
    n = hidden.shape[1]
    if n > constants.length:
        raise ValueError(
            f"A batch of {n} tokens per example is longer than the UDS sketch length T={constants.length}: set "
            f"`uds_sketch_length` to at least the longest padded batch (e.g. `max_length`), or lower `max_length`."
        )
    dtype = factors.factor.dtype
    rows, row_mask = score_rows(hidden.to(dtype), attention_mask, mask_padding)
    factor, projection = factors.factor, factors.projection
    a = rows @ factor[: rows.shape[-1]]
    y = rows @ projection[: rows.shape[-1]]
    if factors.has_bias:  # the constant-1 coordinate of the kept rows
        a = a + row_mask[..., None] * factor[-1]
        y = y + row_mask[..., None] * projection[-1]
    sketch = constants.time_transform(n, dtype, hidden.device) @ y
    return _nuclear_norms(a), sketch.reshape(hidden.shape[0], -1)


@torch.no_grad()
def scores_from_hidden_softcapped(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float,
    constants: SketchConstants,
    attention_mask: torch.Tensor | None = None,
    mask_padding: bool = True,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `scores_from_hidden` for a soft-capped head (`L = c tanh(scale * (H W^T + b) / c)`), which is not linear
    in `H`: the logits are built one vocabulary tile at a time (`[B, N, tile]`, never all V) and folded into the
    `[B, N, N]` Gram matrices and the sketch."""
    batch, n = hidden.shape[:2]
    if n > constants.length:
        raise ValueError(
            f"A batch of {n} tokens per example is longer than the UDS sketch length T={constants.length}: set "
            f"`uds_sketch_length` to at least the longest padded batch (e.g. `max_length`), or lower `max_length`."
        )
    rows, row_mask = score_rows(hidden.to(dtype), attention_mask, mask_padding)
    gram = torch.zeros(batch, n, n, dtype=torch.float64, device=hidden.device)
    y = torch.zeros(batch, n, constants.cols, dtype=dtype, device=hidden.device)
    for start, stop in _vocab_tiles(weight.shape[0], batch * n):
        logits = rows @ weight[start:stop].to(dtype).T
        if bias is not None:
            logits = logits + bias[start:stop].to(dtype)
        logits = softcap * torch.tanh(logits * (scale / softcap)) * row_mask[..., None]
        gram += (logits @ logits.mT).to(torch.float64)
        y += logits @ constants.vocab_transform(start, stop, dtype, hidden.device)
    utility = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(-1)
    sketch = constants.time_transform(n, dtype, hidden.device) @ y
    return utility, sketch.reshape(batch, -1)
