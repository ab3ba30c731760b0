"""Orthogonal Hadamard matrices of order n = m·2^k, their fast transform, and a fallback.

Used by QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs",
arXiv 2404.00456): an orthogonal matrix whose entries all have the same magnitude spreads an
outlier channel over every channel, so a rotated activation has no outliers.

Construction (from the mathematics, no stored tables):

- Sylvester: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, −H_n]]`` — orders 2^k.
- Paley I: for a prime power q ≡ 3 (mod 4), order q + 1 (q = 11 → 12, 19 → 20, 43 → 44, 59 → 60).
- Paley II: for a prime power q ≡ 1 (mod 4), order 2(q + 1) (q = 5 → 12, 13 → 28, 17 → 36,
  25 → 52).
- Kronecker: ``H_{m·2^k} = H_m ⊗ H_{2^k}`` with m a Paley order (or 1), e.g. 576 = 36·16,
  1536 = 12·128, 192 = 12·16, 40 = 20·2.

Prime powers are supported for q = p and q = p² (GF(p²) built as GF(p)[x]/(x² − r) with r a
non-residue). Every matrix returned is normalized: ``H Hᵀ = I``.

Sizes with no such factorization (any odd n > 1, 9·2^k for k < 2, or 92, which needs
Williamson's construction) raise :class:`~channelwise.errors.UnsupportedModelError`; a caller
that only needs *some* orthogonal matrix may fall back to :func:`random_orthogonal`, a seeded
Haar-random rotation (spreads outliers as well in expectation, but is dense: no fast transform).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from channelwise.errors import UnsupportedModelError


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e`` for e ∈ {1, 2}, p an odd prime; ``None`` otherwise."""
    if _is_prime(q) and q > 2:
        return q, 1
    root = math.isqrt(q)
    if root * root == q and _is_prime(root) and root > 2:
        return root, 2
    return None


def _field_characters(q: int) -> list[int]:
    """χ(a − b) for every pair of GF(q) elements as a flat ``q×q`` list (χ: quadratic character).

    Elements are numbered 0…q−1; for q = p² the element ``a + b·x`` (x² = r) is ``a + p·b``.
    """
    p, e = _prime_power(q)  # type: ignore[misc]
    if e == 1:
        squares = {(a * a) % p for a in range(1, p)}
        chi = [0] + [1 if a in squares else -1 for a in range(1, p)]
        return [chi[(j - i) % p] for i in range(p) for j in range(p)]
    r = next(a for a in range(2, p) if pow(a, (p - 1) // 2, p) == p - 1)  # a non-residue mod p

    def mul(u: tuple[int, int], v: tuple[int, int]) -> tuple[int, int]:
        return ((u[0] * v[0] + r * u[1] * v[1]) % p, (u[0] * v[1] + u[1] * v[0]) % p)

    squares = set()
    for a in range(p):
        for b in range(p):
            if a or b:
                squares.add(mul((a, b), (a, b)))
    elems = [(n % p, n // p) for n in range(q)]

    def chi(u: tuple[int, int]) -> int:
        return 0 if u == (0, 0) else (1 if u in squares else -1)

    return [chi(((v[0] - u[0]) % p, (v[1] - u[1]) % p)) for u in elems for v in elems]  # χ(j − i)


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix ``Q[i, j] = χ(j − i)`` over GF(q), ``(q, q)`` of 0/±1."""
    return torch.tensor(_field_characters(q), dtype=torch.float64).reshape(q, q)


def _paley_i(q: int) -> Tensor:
    """Order q + 1 for q ≡ 3 (mod 4): ``H = I + S``, S = [[0, 1ᵀ], [−1, Q]] (skew)."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley_ii(q: int) -> Tensor:
    """Order 2(q + 1) for q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] (symmetric), then each 0 →
    [[1, −1], [−1, −1]] and each ±1 → ±[[1, 1], [1, −1]]."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, sign_block) + torch.kron((c == 0).double(), zero_block)


def _paley_kind(m: int) -> str | None:
    """``"sylvester"`` for m = 1, ``"paley_i"``/``"paley_ii"`` when that construction gives m."""
    if m == 1:
        return "sylvester"
    if (m - 1) % 4 == 3 and _prime_power(m - 1):
        return "paley_i"
    if m % 2 == 0 and (m // 2 - 1) % 4 == 1 and _prime_power(m // 2 - 1):
        return "paley_ii"
    return None


def _base_order(m: int) -> Tensor:
    """The unnormalized ±1 Hadamard matrix of order m (m with a ``_paley_kind``)."""
    kind = _paley_kind(m)
    if kind == "paley_i":
        return _paley_i(m - 1)
    if kind == "paley_ii":
        return _paley_ii(m // 2 - 1)
    return torch.ones(1, 1, dtype=torch.float64)


@lru_cache(maxsize=64)
def _factor(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` with n = m·2^k and m constructible, the largest power of two first."""
    if n < 1:
        raise UnsupportedModelError(f"a Hadamard matrix needs a positive order, got {n}")
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        if _paley_kind(n >> j) is not None:
            return n >> j, 1 << j
    raise UnsupportedModelError(
        f"no Hadamard matrix of order {n} is built here: it must be m·2^k with m = 1 or a Paley "
        "order (q+1, q ≡ 3 mod 4, or 2(q+1), q ≡ 1 mod 4; q a prime or prime square); use a "
        "random orthogonal rotation instead (QuaRot: rotation: random)"
    )


def is_hadamard_size(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order ``n``."""
    try:
        _factor(n)
    except UnsupportedModelError:
        return False
    return True


@lru_cache(maxsize=16)
def _base_normalized(m: int) -> Tensor:
    return _base_order(m) / math.sqrt(m)


def _sylvester(size: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalized Hadamard matrix ``H_m ⊗ H_{2^k} / √n``, ``(n, n)``, with ``H Hᵀ = I``.

    Raises :class:`~channelwise.errors.UnsupportedModelError` when ``n`` has no known
    factorization (see the module docstring).
    """
    m, power = _factor(n)
    h = torch.kron(_base_order(m), _sylvester(power)) / math.sqrt(n)
    return h.to(dtype)


def fast_walsh_hadamard(x: Tensor) -> Tensor:
    """``x @ S`` along the last dim, S the unnormalized Sylvester matrix; ``(..., 2^k)``.

    Butterfly: log2(n) passes of (a + b, a − b), O(n log n) per row.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise UnsupportedModelError(f"the fast Walsh–Hadamard transform needs 2^k, got {n}")
    batch = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*batch, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*batch, n)


def hadamard_transform(x: Tensor, n: int | None = None) -> Tensor:
    """``x @ hadamard_matrix(n)`` along the last dim, ``(..., n) → (..., n)``, without forming it.

    With n = m·2^k and X the ``(m, 2^k)`` view of a row: ``X (H_m ⊗ H_2^k) = H_mᵀ X H_2^k``;
    the 2^k factor is the butterfly, the m factor a small matmul. Computed in ``x``'s dtype.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise UnsupportedModelError(f"hadamard_transform of order {n} got last dim {x.shape[-1]}")
    m, power = _factor(n)
    batch = x.shape[:-1]
    y = fast_walsh_hadamard(x.reshape(*batch, m, power))
    if m > 1:
        base = _base_normalized(m).to(device=x.device, dtype=x.dtype)
        y = torch.matmul(base.t(), y)
        return y.reshape(*batch, n) / math.sqrt(power)
    return y.reshape(*batch, n) / math.sqrt(n)


def random_signs(n: int, seed: int) -> Tensor:
    """``n`` seeded random ±1 values (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


def random_hadamard(n: int, seed: int = 0) -> Tensor:
    """QuaRot's randomized Hadamard ``diag(s)·H``, ``(n, n)`` float64, s seeded ±1.

    Applied to row vectors as ``x ← x·Q``, the signs flip the input channels *before* the mix
    (the column-vector form is ``Qᵀx = Hᵀ diag(s) x``); flipping after the mix would only flip
    output signs and change no magnitude.
    """
    return random_signs(n, seed)[:, None] * hadamard_matrix(n)


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """A seeded Haar-random orthogonal ``(n, n)`` float64: QR of a Gaussian, signs fixed so that
    R has a positive diagonal (which makes the distribution uniform). Fallback for any n."""
    generator = torch.Generator().manual_seed(seed)
    gauss = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))[None, :]
