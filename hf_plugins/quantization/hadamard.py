"""Orthogonal Hadamard transforms of any size the models need, applied along the last dimension.

A Hadamard matrix of order `n` has entries ±1 and `H Hᵀ = n I`; `H / sqrt(n)` is orthogonal. This module builds:

- Sylvester matrices for powers of two (`[[H, H], [H, -H]]`), applied by a fast Walsh-Hadamard transform (FWHT) in
  `O(n log n)` per row;
- Paley matrices for the other orders the models use: Paley I gives order `q + 1` for a prime power `q ≡ 3 (mod 4)`
  (12, 20, 24, 28, 44, 48, 60, 68, 72, 84, 140, 344, ...), Paley II gives order `2 (q + 1)` for a prime power
  `q ≡ 1 (mod 4)` (12, 20, 28, 36, 60, 76, 108, 148, ...). Prime powers `p^k` with `k <= 3` are supported (finite
  field arithmetic modulo an irreducible polynomial found by search);
- Kronecker products `H_K ⊗ H_P` with `H_K` a Paley matrix and `H_P` a Sylvester matrix: for example
  4864 = 76 x 64, 11008 = 344 x 32, 14336 = 28 x 512, 18944 = 148 x 128. The transform reshapes a row to
  `[K, P]`, runs the FWHT on `P` and a `K x K` matmul on `K`.

Every constructed matrix is checked (`H Hᵀ = n I`) when it is built. Sizes with no construction here fall back to a
seeded random orthogonal matrix (QR of a Gaussian), with a warning: it is as exact an identity of the float model, but
a dense `n x n` matmul and without the Hadamard's guarantee of spreading every outlier evenly.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch


__all__ = [
    "HadamardTransform",
    "fwht",
    "hadamard_factorization",
    "hadamard_matrix",
    "paley_order_available",
    "random_orthogonal_matrix",
    "random_sign_hadamard_matrix",
]


# ---------------------------------------------------------------------------------------------- finite fields


def _prime_power(q: int) -> tuple[int, int] | None:
    """`(p, k)` with `q = p^k`, p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """Coefficients `(c_0, ..., c_{k-1})` of a monic irreducible `x^k + c_{k-1} x^{k-1} + ... + c_0` over GF(p), for
    k <= 3 (where irreducible means: no root in GF(p))."""
    for index in range(p**k):
        coeffs = tuple((index // p**i) % p for i in range(k))
        if coeffs[0] == 0:
            continue
        if all((pow(x, k, p) + sum(c * pow(x, i, p) for i, c in enumerate(coeffs))) % p for x in range(p)):
            return coeffs
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover


def _quadratic_character(q: int) -> tuple[list[int], int, int]:
    """For GF(q): the quadratic character of every element (elements indexed by their base-p digits: 0 for 0, 1 for
    a nonzero square, -1 otherwise), and `(p, k)`."""
    p, k = _prime_power(q)
    if k > 3:
        raise ValueError(f"GF({q}) = GF({p}^{k}) is not supported (degree > 3)")
    modulus = _irreducible(p, k) if k > 1 else ()

    def multiply(a: int, b: int) -> int:
        da = [(a // p**i) % p for i in range(k)]
        db = [(b // p**i) % p for i in range(k)]
        prod = [0] * (2 * k - 1)
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                prod[i + j] = (prod[i + j] + x * y) % p
        for degree in range(2 * k - 2, k - 1, -1):  # reduce with x^k = -sum c_i x^i
            top = prod[degree]
            if top:
                prod[degree] = 0
                for i, c in enumerate(modulus):
                    prod[degree - k + i] = (prod[degree - k + i] - top * c) % p
        return sum(prod[i] * p**i for i in range(k))

    chi = [-1] * q
    chi[0] = 0
    for a in range(1, q):
        chi[multiply(a, a)] = 1
    return chi, p, k


def _jacobsthal(q: int) -> torch.Tensor:
    """`Q[a, b] = χ(a - b)` over GF(q), as a `[q, q]` float64 tensor."""
    chi, p, k = _quadratic_character(q)
    index = torch.arange(q)
    digits = torch.stack([(index // p**i) % p for i in range(k)], dim=-1)  # [q, k]
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # [q, q, k]
    diff_index = (diff * torch.tensor([p**i for i in range(k)])).sum(-1)
    return torch.tensor(chi, dtype=torch.float64)[diff_index]


def _paley1(q: int) -> torch.Tensor:
    """Paley I: order q + 1 for a prime power q ≡ 3 (mod 4). `H = I + S` with the skew `S = [[0, 1ᵀ], [-1, Q]]`."""
    n = q + 1
    skew = torch.zeros(n, n, dtype=torch.float64)
    skew[0, 1:] = 1.0
    skew[1:, 0] = -1.0
    skew[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + skew


def _paley2(q: int) -> torch.Tensor:
    """Paley II: order 2 (q + 1) for a prime power q ≡ 1 (mod 4), from the symmetric conference matrix
    `C = [[0, 1ᵀ], [1, Q]]`: 0 -> [[1, -1], [-1, -1]], ±1 -> ±[[1, 1], [1, -1]]."""
    n = q + 1
    conference = torch.zeros(n, n, dtype=torch.float64)
    conference[0, 1:] = 1.0
    conference[1:, 0] = 1.0
    conference[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, sign_block) + torch.kron((conference == 0).to(torch.float64), zero_block)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_construction(n: int):
    """The Paley construction of order n (a multiple of 4), or None."""
    if n % 4:
        return None
    q = n - 1
    pk = _prime_power(q)
    if pk is not None and pk[1] <= 3 and q % 4 == 3:
        return functools.partial(_paley1, q)
    q = n // 2 - 1
    pk = _prime_power(q)
    if pk is not None and pk[1] <= 3 and q % 4 == 1:
        return functools.partial(_paley2, q)
    return None


def paley_order_available(n: int) -> bool:
    """Whether a Paley construction of order `n` exists here."""
    return _paley_construction(n) is not None


@functools.lru_cache(maxsize=64)
def _checked_hadamard(n: int) -> torch.Tensor:
    if _is_power_of_two(n):
        h = _sylvester(n)
    else:
        construction = _paley_construction(n)
        if construction is None:
            raise ValueError(f"no Hadamard construction of order {n} is known here")
        h = construction()
    if not torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64)) or not torch.equal(
        h.abs(), torch.ones_like(h)
    ):
        raise AssertionError(f"the constructed Hadamard matrix of order {n} is not Hadamard")  # pragma: no cover
    return h


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """`(K, P)` with `n = K * P`, `P` a power of two and `K` the smallest order with a Paley construction (`K = 1`
    for a power of two), or None when no such split exists."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    power = n & -n  # the largest power of two dividing n
    odd = n // power
    if odd == 1:
        return 1, n
    k_factor, p_factor = odd, power
    while True:
        if paley_order_available(k_factor):
            return k_factor, p_factor
        if p_factor == 1:
            return None
        k_factor, p_factor = k_factor * 2, p_factor // 2


def hadamard_matrix(n: int, normalized: bool = True, dtype=torch.float64) -> torch.Tensor:
    """A Hadamard matrix of order `n` (Sylvester, Paley, or their Kronecker product `H_K ⊗ H_P`); divided by
    `sqrt(n)` (orthogonal) when `normalized`. Raises a `ValueError` for an order with no construction here."""
    split = hadamard_factorization(n)
    if split is None:
        raise ValueError(
            f"no Hadamard construction of order {n} is known here (orders 2^a * K with a Paley order K, such as 12, "
            "20, 28, 76, 344, are)"
        )
    k_factor, p_factor = split
    h = _checked_hadamard(p_factor)
    if k_factor > 1:
        h = torch.kron(_checked_hadamard(k_factor), h)
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype)


def random_orthogonal_matrix(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A seeded random orthogonal `n x n` matrix (QR of a Gaussian, signs fixed so it is Haar distributed)."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype)


def fwht(x: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Fast Walsh-Hadamard transform along the last dimension (a power of two): `x @ H` with the Sylvester `H`
    (divided by `sqrt(n)` when `normalized`). Differentiable; `H` is symmetric and, normalised, its own inverse."""
    n = x.shape[-1]
    if not _is_power_of_two(n):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(*lead, n)
    return y / math.sqrt(n) if normalized else y


#: Largest Sylvester factor applied as one dense matmul: a power-of-two order above it is split into Kronecker factors
#: of at most this order (Sylvester: `H_ab = H_a ⊗ H_b`), so a transform costs at most `2 * 128` flops per element
#: per factor, in a few large matmuls rather than the `log2(n)` memory-bound passes of a butterfly.
MAX_DENSE_FACTOR = 128


def _kronecker_factors(k_factor: int, p_factor: int) -> list[int]:
    """Orders whose Kronecker product, in this order, is the matrix of `hadamard_matrix(k_factor * p_factor)`."""
    factors = [k_factor] if k_factor > 1 else []
    while p_factor > 1:
        factor = min(p_factor, MAX_DENSE_FACTOR)
        factors.append(factor)
        p_factor //= factor
    return factors


class _OrthogonalTransform(torch.autograd.Function):
    """`x -> T(x)` for an orthogonal `T`: the backward is `g -> T⁻¹(g)`, so nothing is saved for it."""

    @staticmethod
    def forward(ctx, x, transform, inverse):
        ctx.transform, ctx.inverse = transform, inverse
        return transform._apply(x, inverse)

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.transform._apply(grad_output, not ctx.inverse), None, None


class HadamardTransform:
    """The orthogonal transform `x -> x @ H` along the last dimension, `H` the normalised Hadamard matrix of order
    `size` (or, where none is known, a seeded random orthogonal matrix, with a warning). `inverse=True` applies
    `x @ Hᵀ`. Differentiable, with a backward that saves no activation (the transform of the gradient).

    `H` is applied as a Kronecker product of small unnormalised ±1 factors (the Paley factor `K` of a non-power-of-two
    order, and Sylvester factors of at most `MAX_DENSE_FACTOR`), one matmul per factor on a view of `x`, then one
    scaling by `1 / sqrt(size)`. The ±1 matrices are exact in every dtype, so bf16 inputs are rounded once per
    factor and once by the scaling.

    Args:
        size (`int`): the last dimension of the tensors it transforms.
        seed (`int`, *optional*, defaults to `0`): seed of the random orthogonal fallback.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        split = hadamard_factorization(self.size)
        self._cast_cache: dict = {}
        if split is None:
            warnings.warn(
                f"No Hadamard matrix of order {self.size} is known here: using a seeded random orthogonal matrix "
                f"instead (an exact rotation too, applied as a dense {self.size}x{self.size} matmul).",
                stacklevel=2,
            )
            self.kind = "random"
            self.k_factor, self.p_factor = self.size, 1
            self._factors = [random_orthogonal_matrix(self.size, seed=seed)]
            self._scale = 1.0
        else:
            self.k_factor, self.p_factor = split
            self.kind = "sylvester" if self.k_factor == 1 else "kronecker"
            self._factors = [_checked_hadamard(n) for n in _kronecker_factors(self.k_factor, self.p_factor)]
            self._scale = 1.0 / math.sqrt(self.size)

    def __repr__(self):
        return f"HadamardTransform(size={self.size}, K={self.k_factor}, P={self.p_factor}, kind={self.kind!r})"

    def _factors_as(self, x: torch.Tensor) -> list[torch.Tensor]:
        key = (x.dtype, x.device)
        if key not in self._cast_cache:
            self._cast_cache[key] = [f.to(dtype=x.dtype, device=x.device) for f in self._factors]
        return self._cast_cache[key]

    def _apply(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """`x @ H` (or `x @ Hᵀ`) in `x`'s dtype, without autograd bookkeeping of its own."""
        # Autocast must not lower the matmuls: a rotated float32 weight would be quantised from bf16 values during
        # mixed-precision training, and from float32 ones at export
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._apply_factors(x, inverse)

    def _apply_factors(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        lead = x.shape[:-1]
        factors = self._factors_as(x)
        # x viewed as [rows, f_1, ..., f_m]: x @ (H_1 ⊗ ... ⊗ H_m) contracts axis i with H_i, for every i
        y = x.reshape(-1, self.size)
        before = 1
        for factor in factors:
            order = factor.shape[0]
            after = self.size // (before * order)
            m = factor.t() if inverse else factor
            if after == 1:  # the last axis: a right multiplication
                y = (y.reshape(-1, order) @ m).reshape(-1, self.size)
            else:  # a middle axis: a left multiplication, broadcast over the rows and the axes before it
                y = torch.matmul(m.t(), y.reshape(-1, order, after)).reshape(-1, self.size)
            before *= order
        if self._scale != 1.0:
            y = y * self._scale
        return y.reshape(*lead, self.size)

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"HadamardTransform of size {self.size} got a last dimension of {x.shape[-1]}")
        if torch.is_grad_enabled() and x.requires_grad:
            return _OrthogonalTransform.apply(x, self, inverse)
        return self._apply(x, inverse)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """The `size x size` matrix `H` of the transform (`x @ H`)."""
        return self(torch.eye(self.size, dtype=torch.float64)).to(dtype)


def random_sign_hadamard_matrix(n: int, seed: int = 42, dtype=torch.float64) -> torch.Tensor:
    """`diag(s) H`: the normalised Hadamard matrix of order `n` with its rows multiplied by seeded random signs `s`
    (QuaRot's randomised Hadamard; RoSTE's R1). Orthogonal."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    h = HadamardTransform(n, seed=seed).matrix()  # warns where it falls back to a random orthogonal matrix
    return (signs.unsqueeze(1) * h).to(dtype)
