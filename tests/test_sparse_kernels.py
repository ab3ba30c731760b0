"""The sparse decode kernels (channelwise.kernels.sparse) against a plain float64 reference, on
float32, W8 and W4 weights, random and adversarial; and the same calls without the extension.

Tolerance as in test_kernels.py: an fp32 sum of K products in any order is within
``(K + 2) · 2⁻²⁴ · Σ|x w|`` of the exact one (a wrong row, column, nibble or scale errs by far
more).
A W4 weight is formed as ``q·s + (−z·s)`` (two roundings of terms up to ``(|q| + |z|)·s``, which
cancel when ``q ≈ z``), so for W4 ``|w|`` in that bound is ``(|q| + |z|)·s`` and K is K + 2.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from channelwise.kernels import KernelInputError, kernel_available
from channelwise.kernels import sparse as sk
from channelwise.kernels.extension import _state, load_ops

EPS32 = 2.0**-24
KINDS = ["f32", "w8", "w4"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weight(kind: str, out: int, inp: int, seed: int, group: int = 64) -> sk.SparseWeight:
    g = gen(seed)
    if kind == "f32":
        return sk.SparseWeight(torch.randn(out, inp, generator=g))
    if kind == "w8":
        codes = torch.randint(-128, 128, (out, inp), generator=g, dtype=torch.int8)
        return sk.SparseWeight(codes, torch.rand(out, generator=g) * 0.1 + 1e-3)
    codes = torch.randint(0, 256, (out, inp // 2), generator=g, dtype=torch.uint8)
    scale = torch.rand(out, inp // group, generator=g) * 0.1 + 1e-3
    zero = torch.rand(out, inp // group, generator=g) * 15
    return sk.SparseWeight(codes, scale, zero, group)


def dense64(weight: sk.SparseWeight) -> torch.Tensor:
    """The rows-form weight ``(N, K)`` in float64, de-quantized independently of the module."""
    w = weight.w
    if w.dtype == torch.int8:
        return w.double() * weight.scale.double()[:, None]
    if w.dtype == torch.uint8:
        codes = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(w.shape[0], -1).double()
        s = weight.scale.double().repeat_interleave(weight.group, dim=1)
        z = weight.zero.double().repeat_interleave(weight.group, dim=1)
        return (codes - z) * s
    return w.double()


def magnitude64(weight: sk.SparseWeight) -> torch.Tensor:
    """What each weight's float32 rounding errors scale with (see the module docstring)."""
    w = weight.w
    if w.dtype != torch.uint8:
        return dense64(weight).abs()
    codes = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(w.shape[0], -1).double()
    s = weight.scale.double().repeat_interleave(weight.group, dim=1)
    z = weight.zero.double().abs().repeat_interleave(weight.group, dim=1)
    return (codes + z) * s


def assert_close_to(
    got: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, magnitude: torch.Tensor | None = None
) -> None:
    """``got`` ≈ ``x @ w64.T`` within the fp32 summation bound."""
    x64 = x.double()
    expected = x64 @ w64.T
    magnitude = w64.abs() if magnitude is None else magnitude
    bound = (x64.abs() @ magnitude.T) * (x.shape[-1] + 4) * EPS32 + 1e-30
    assert got.dtype == torch.float32 and got.shape == expected.shape
    excess = (got.double() - expected).abs() - bound
    assert (excess <= 0).all(), f"max excess over the bound: {excess.max().item():.3g}"


def index_sets(n: int) -> dict[str, torch.Tensor]:
    g = gen(n)
    return {
        "empty": torch.empty(0, dtype=torch.long),
        "first": torch.tensor([0]),
        "last": torch.tensor([n - 1]),
        "all": torch.arange(n),
        "half": torch.randperm(n, generator=g)[: n // 2].sort().values,
        "tail_of_a_tile": torch.arange(n - 6, n),  # 6 = one tile of 4 rows + 2 rows one by one
    }


@pytest.fixture(params=[True, False], ids=["extension", "torch"])
def extension(request, monkeypatch):
    """Each test runs through the AVX-512 extension and through the pure-torch fallback."""
    if request.param:
        if not kernel_available():
            pytest.skip("the extension is not available on this host")
    else:
        monkeypatch.setitem(_state, "ops", None)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 3, 5])
def test_rows_equal_the_reference_rows(extension, kind, m) -> None:
    n, k = 96, 128
    weight = random_weight(kind, n, k, seed=1)
    x = torch.randn(m, k, generator=gen(2))
    w64, magnitude = dense64(weight), magnitude64(weight)
    for name, idx in index_sets(n).items():
        got = sk.rows_linear(x, idx, weight)
        assert got.shape == (m, idx.numel()), name
        assert_close_to(got, x, w64[idx], magnitude[idx])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 2, 3, 5])
# Output widths: one to three 32-column blocks, then 9 and 17 blocks (W4 chunks of up to 8
# blocks split unevenly, for one thread or several).
@pytest.mark.parametrize("n", [32, 64, 96, 288, 544])
def test_columns_equal_the_reference_columns(extension, kind, m, n) -> None:
    k = 192  # three W4 groups of 64 along the input
    weight = random_weight(kind, n, k, seed=3)
    weight_t = sk.transpose_weight(weight)
    w64, magnitude = dense64(weight), magnitude64(weight)
    for name, idx in index_sets(k).items():
        h = torch.randn(m, idx.numel(), generator=gen(4))
        got = sk.cols_linear(h, idx, weight_t)
        assert got.shape == (m, n), name
        assert_close_to(got, h, w64[:, idx], magnitude[:, idx])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 3])
def test_w4_columns_over_threads_equal_the_reference(extension, threads, m) -> None:
    """Large enough that threads split the output columns, in chunks whose count is a multiple
    of the threads (9 blocks of 32 columns: uneven chunks); 25 K-groups of 64."""
    n, k = 288, 1600
    weight = random_weight("w4", n, k, seed=7)
    weight_t = sk.transpose_weight(weight)
    w64, magnitude = dense64(weight), magnitude64(weight)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, idx in index_sets(k).items():
            h = torch.randn(m, idx.numel(), generator=gen(8))
            got = sk.cols_linear(h, idx, weight_t)
            assert got.shape == (m, n), name
            assert_close_to(got, h, w64[:, idx], magnitude[:, idx])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_columns_form_holds_the_same_weight(kind) -> None:
    weight = random_weight(kind, 64, 128, seed=5)
    columns = sk.columns_reference(sk.transpose_weight(weight))
    assert torch.equal(columns.T, sk.rows_reference(weight, torch.arange(64)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 2, 4, 6])
@pytest.mark.parametrize("active", [0.0, 0.3, 1.0])
def test_fused_mlp_equals_the_dense_product(extension, kind, m, active) -> None:
    hidden, inter = 64, 192
    up = random_weight(kind, inter, hidden, seed=6)
    down = random_weight(kind, hidden, inter, seed=7)
    x = torch.randn(1, m, hidden, generator=gen(8))
    a = torch.randn(1, m, inter, generator=gen(9))
    a = a * (torch.rand(1, m, inter, generator=gen(10)) < active)
    got = sk.sparse_mlp(x, a, up, sk.transpose_weight(down))
    h = a.double() * (x.double() @ dense64(up).T)
    expected = h @ dense64(down).T
    bound = (a.double().abs() * (x.double().abs() @ magnitude64(up).T)) @ magnitude64(down).T
    assert got.shape == (1, m, hidden)
    assert ((got.double() - expected).abs() <= bound * (hidden + inter + 4) * EPS32 + 1e-30).all()
    if active == 0.0:
        assert (got == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_inputs(extension, kind) -> None:
    """Outliers, constant and zero channels, extreme codes: still the reference; a NaN input
    makes its own output row NaN and no other."""
    n, k = 64, 128
    weight = random_weight(kind, n, k, seed=11)
    if kind == "w8":
        weight.w[0].fill_(-128)
        weight.w[1].fill_(127)
    if kind == "w4":
        weight.w[0].fill_(0x00)
        weight.w[1].fill_(0xFF)
    x = torch.randn(3, k, generator=gen(12))
    x[0, 5] = 1e6  # outlier
    x[1] = 0.25  # constant
    x[2, :64] = 0  # zero channels
    idx = torch.tensor([0, 1, 2, 40, 63])
    rows = sk.rows_linear(x, idx, weight)
    assert_close_to(rows, x, dense64(weight)[idx], magnitude64(weight)[idx])
    h = x[:, idx].contiguous()
    other = random_weight(kind, 64, 128, seed=13)
    cols = sk.cols_linear(h, idx, sk.transpose_weight(other))
    assert_close_to(cols, h, dense64(other)[:, idx], magnitude64(other)[:, idx])
    weight_t = sk.transpose_weight(other)
    x[1, 3] = float("nan")
    rows = sk.rows_linear(x, idx, weight)
    assert rows[1].isnan().all() and not rows[[0, 2]].isnan().any()
    h = x[:, idx].contiguous()
    h[1, 2] = float("nan")
    cols = sk.cols_linear(h, idx, weight_t)
    assert cols[1].isnan().all() and not cols[[0, 2]].isnan().any()


@pytest.mark.parametrize(
    "idx, message",
    [
        (torch.tensor([3, 1]), "increasing"),
        (torch.tensor([1, 1]), "increasing"),
        (torch.tensor([0, 96]), "within"),
        (torch.tensor([-1]), "within"),
        (torch.tensor([0, 1], dtype=torch.int32), "int64"),
    ],
)
def test_bad_indices_are_one_clear_error(idx, message) -> None:
    if not kernel_available():
        pytest.skip("the checks are the extension's")
    weight = random_weight("f32", 96, 64, seed=14)
    with pytest.raises(KernelInputError, match=message):
        sk.rows_linear(torch.randn(1, 64), idx, weight)


def test_w4_columns_need_whole_32_column_blocks() -> None:
    with pytest.raises(KernelInputError, match="multiple of 32"):
        sk.transpose_weight(random_weight("w4", 48, 64, seed=15))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("active", [0.0, 0.4, 1.0])
def test_sparse_input_equals_the_dense_product(extension, kind, m, active) -> None:
    weight = random_weight(kind, 96, 128, seed=16)
    x = torch.randn(2, m, 128, generator=gen(17))
    x = x * (torch.rand(2, m, 128, generator=gen(18)) < active)
    got = sk.sparse_input_linear(x, sk.transpose_weight(weight))
    assert got.shape == (2, m, 96)
    assert_close_to(got.reshape(-1, 96), x.reshape(-1, 128), dense64(weight), magnitude64(weight))
    if active == 0.0:
        assert (got == 0).all()


@pytest.mark.parametrize("k", [200, 7])  # the active-channel scan's partial last 16 channels
def test_sparse_input_finds_the_active_channels_of_any_width(extension, k) -> None:
    """A channel counts when it is nonzero in any row (here only in one), down to the last
    channel of a width that is not a multiple of 16."""
    weight = random_weight("f32", 48, k, seed=22)
    x = torch.zeros(3, k)
    x[0, 0], x[2, k - 1], x[1, k // 2] = 1.5, -2.0, 0.5
    x[2, 1::3] = torch.randn(len(range(1, k, 3)), generator=gen(23))
    got = sk.sparse_input_linear(x, sk.transpose_weight(weight))
    assert_close_to(got, x, dense64(weight), magnitude64(weight))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 2, 199])  # the first, a middle and the partial last vector
def test_the_active_channel_scan_refuses_non_finite_activations(extension, bad, where) -> None:
    """Inside a compiled graph the thresholding is plain torch ops, so the sparse kernels'
    scan is what refuses NaN/inf there: in either op, in any row, on any channel."""
    from channelwise.errors import NonFiniteError

    k = 200
    x = torch.randn(3, k, generator=gen(24))
    x[2, where] = bad
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        sk.sparse_input_linear(x, sk.transpose_weight(random_weight("f32", 48, k, seed=25)))
    up, down = random_weight("f32", k, 64, seed=26), random_weight("f32", 48, k, seed=27)
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        sk.sparse_mlp(torch.randn(3, 64, generator=gen(28)), x, up, sk.transpose_weight(down))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 37), (2, 5, 64), (3, 0, 16)])
def test_sparsify_zeroes_exactly_the_small_entries(extension, per_channel, shape) -> None:
    x = torch.randn(*shape, generator=gen(19))
    if x.numel():
        x.view(-1)[0] = 0.0
        x.view(-1)[-1] = 1e30
    threshold = torch.rand(shape[-1], generator=gen(20)) if per_channel else torch.tensor(0.6)
    expected = torch.where(x.abs() < threshold, torch.zeros_like(x), x)
    assert torch.equal(sk.sparsify(x, threshold), expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_sparsify_refuses_non_finite_activations(extension, bad) -> None:
    from channelwise.errors import NonFiniteError

    x = torch.randn(2, 40, generator=gen(21))
    x[1, 37] = bad
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        sk.sparsify(x, torch.tensor(0.5))


def test_w4_columns_in_another_layout_are_one_clear_error() -> None:
    """A W4 columns weight that is not ``transpose_weight``'s ``(K, N/32, 16)`` (here the
    row-major ``(K, N/2)`` codes, and the block-major ``(N/32, K, 16)`` of an earlier version)
    is refused, not read as if it were."""
    if not kernel_available():
        pytest.skip("the checks are the extension's")
    weight_t = sk.transpose_weight(random_weight("w4", 64, 128, seed=16))
    h, idx = torch.randn(1, 2), torch.tensor([0, 5])
    for other in (weight_t.w.reshape(128, 32), weight_t.w.permute(1, 0, 2).contiguous()):
        with pytest.raises(KernelInputError, match=r"\(K, N/32, 16\)"):
            sk.cols_linear(h, idx, replace(weight_t, w=other))


def block_pruned(n: int, k: int, width: int, pattern: str, seed: int) -> torch.Tensor:
    """A weight ``(n, k)`` zero outside some 16-row × ``width`` segments."""
    g = gen(seed)
    w = torch.randn(n, k, generator=g)
    strips, segments = -(-n // 16), k // width
    keep = torch.rand(strips, segments, generator=g) < 0.5
    if pattern != "half":
        keep.fill_(pattern != "none")
    if pattern == "one_strip_empty":
        keep[0] = False
    mask = keep.repeat_interleave(16, 0)[:n].repeat_interleave(width, 1)
    return w * mask


SHAPES = [(48, 64, 16), (40, 96, 32), (32, 72, 8), (17, 48, 48)]  # (N, K, segment width)


@pytest.mark.parametrize("pattern", ["half", "all", "none", "one_strip_empty"])
@pytest.mark.parametrize(("n", "k", "width"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_block_sparse_equals_the_dense_masked_product(extension, pattern, n, k, width, bias):
    w = block_pruned(n, k, width, pattern, seed=n + k)
    packed = sk.BlockSparseWeight.from_dense(w, width)
    assert torch.equal(packed.dense(), w)
    b = torch.randn(n, generator=gen(5)) if bias else None
    # One extra input column of ones carries the bias through the float64 reference.
    w64 = torch.cat((w, (b if bias else torch.zeros(n))[:, None]), dim=1).double()
    for m in (1, 13, 97, 200):  # one row, tails of a 12-row tile, beyond one 96-row chunk
        x = torch.randn(m, k, generator=gen(m))
        got = sk.block_sparse_linear(x, packed, b)
        assert_close_to(got, torch.cat((x, torch.ones(m, 1)), dim=1), w64)
    x = torch.randn(2, 7, k, generator=gen(6))
    assert sk.block_sparse_linear(x, packed, b).shape == (2, 7, n)


def test_block_sparse_stores_only_the_kept_segments_and_refuses_bad_input():
    w = block_pruned(64, 128, 16, "half", seed=7)
    packed = sk.BlockSparseWeight.from_dense(w, 16)
    kept = w.reshape(4, 16, 8, 16).ne(0).any(3).any(1)
    assert packed.blocks.shape == (int(kept.sum()), 16, 16)
    assert packed.stored_fraction == pytest.approx(kept.float().mean().item())
    with pytest.raises(KernelInputError, match="do not split"):
        sk.BlockSparseWeight.from_dense(w, 48)
    with pytest.raises(KernelInputError, match="input has 112 features, the weight 128"):
        sk.block_sparse_linear(torch.randn(3, 112), packed, None)
    if kernel_available():
        broken = replace(packed, columns=packed.columns + 100)
        with pytest.raises(KernelInputError, match="out of range"):
            sk.block_sparse_linear(torch.randn(3, 128), broken, None)
        operands = (packed.blocks, packed.starts, packed.columns, None, packed.out_features)
        with pytest.raises(RuntimeError, match="multiple of the segment width"):
            load_ops().block_sparse_mm(torch.randn(3, 120), *operands)
