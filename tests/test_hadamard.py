"""Specification of the Hadamard constructions: orthogonal, ±1/√n entries, fast = matrix."""

import math

import pytest
import torch

from channelwise.errors import UnsupportedModelError
from channelwise.transforms.hadamard import (
    fast_walsh_hadamard,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
    random_hadamard,
    random_orthogonal,
)

# Paley I (12, 20, 44, 60), Paley II (28, 36, 52 from q = 25 = 5²), Kronecker products with 2^k
# (40, 48, 96, 192, 576, 1536) and plain Sylvester (64).
ORDERS = (1, 2, 12, 20, 28, 36, 40, 44, 48, 52, 60, 64, 96, 192, 576, 1536)


def assert_orthogonal(h: torch.Tensor) -> None:
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    assert torch.allclose(h @ h.T, eye, atol=1e-12)
    assert torch.allclose(h.T @ h, eye, atol=1e-12)


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_matrix_is_orthogonal_with_equal_magnitudes(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert_orthogonal(h)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-12)


@pytest.mark.parametrize("n", (12, 36, 64, 192, 576))
def test_fast_transform_equals_multiplication_by_the_matrix(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n), atol=1e-12)
    x32 = x.float()
    expected = (x @ hadamard_matrix(n)).float()
    assert torch.allclose(hadamard_transform(x32, n), expected, atol=1e-5)


def test_butterfly_is_the_unnormalized_sylvester_matrix() -> None:
    x = torch.eye(8, dtype=torch.float64)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    expected = torch.kron(torch.kron(sylvester, sylvester), sylvester)
    assert torch.equal(fast_walsh_hadamard(x), expected)


@pytest.mark.parametrize("n", (9, 92, 184))
def test_unbuildable_orders_are_refused_clearly(n: int) -> None:
    assert not is_hadamard_size(n)
    with pytest.raises(UnsupportedModelError, match=f"order {n}.*rotation: random"):
        hadamard_matrix(n)
    with pytest.raises(UnsupportedModelError):
        hadamard_transform(torch.zeros(2, n))


def test_random_hadamard_flips_input_channels_before_mixing() -> None:
    q = random_hadamard(12, seed=3)
    assert_orthogonal(q)
    signs = (q / hadamard_matrix(12))[:, 0]
    assert torch.equal(q, signs[:, None] * hadamard_matrix(12))
    assert set(signs.round().tolist()) == {-1.0, 1.0}
    assert torch.equal(q, random_hadamard(12, seed=3))
    assert not torch.equal(q, random_hadamard(12, seed=4))


@pytest.mark.parametrize("n", (9, 92))
def test_random_orthogonal_fallback_is_seeded_and_orthogonal(n: int) -> None:
    q = random_orthogonal(n, seed=1)
    assert_orthogonal(q)
    assert torch.equal(q, random_orthogonal(n, seed=1))
    assert not torch.allclose(q, random_orthogonal(n, seed=2))
