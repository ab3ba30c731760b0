"""Specification of the quantizer core: granularities, qparams, (fake-)quantization."""

import itertools

import pytest
import torch

from channelwise.errors import NonFiniteError, QuantConfigError
from channelwise.quant import (
    PerColumn,
    PerGroup,
    PerRow,
    PerTensor,
    QParams,
    QuantSpec,
    calibration_sample,
    compute_qparams,
    dequantize,
    fake_quantize,
    granularity_from_name,
    qparams_from_range,
    quantization_error,
    quantize,
    static_qparams,
)
from channelwise.quant.core import CALIBRATION_MIN_ROWS, CALIBRATION_SAMPLE

GRANULARITIES = [
    PerTensor(),
    PerRow(),
    PerColumn(),
    PerGroup(16),
    PerGroup(4, "output"),
]
BITS = [2, 3, 4, 8]


def reference_fake_quant(x, bits, symmetric, block_rows, block_cols):
    """Block-by-block loop over a 2-D ``x`` with the textbook formulas."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], block_rows):
        for j in range(0, x.shape[1], block_cols):
            block = x[i : i + block_rows, j : j + block_cols]
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                scale = block.abs().max() / qmax
                zero = torch.tensor(0.0)
            else:
                qmin, qmax = 0, 2**bits - 1
                lo = torch.minimum(block.min(), torch.tensor(0.0))
                hi = torch.maximum(block.max(), torch.tensor(0.0))
                scale = (hi - lo) / qmax
            if scale == 0:
                scale = torch.tensor(1.0)
            if not symmetric:
                zero = torch.clamp(torch.round(-lo / scale), qmin, qmax)
            q = torch.clamp(torch.round(block / scale) + zero, qmin, qmax)
            out[i : i + block_rows, j : j + block_cols] = (q - zero) * scale
    return out


def spec(bits=4, symmetric=True, granularity=None, **kwargs):
    return QuantSpec(bits, symmetric, granularity or PerRow(), **kwargs)


@pytest.mark.parametrize(
    ("granularity", "symmetric", "bits"),
    list(itertools.product(GRANULARITIES, [True, False], BITS)),
    ids=str,
)
def test_fake_quant_matches_loop_reference(granularity, symmetric, bits):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits)) * 3 + 0.5
    block = granularity.block_shape(8, 64)
    expected = reference_fake_quant(x, bits, symmetric, *block)
    got = fake_quantize(x, QuantSpec(bits, symmetric, granularity))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_nd_input_uses_last_dim_as_columns():
    x = torch.randn(2, 4, 64)
    expected = reference_fake_quant(x.reshape(8, 64), 4, False, 1, 16)
    got = fake_quantize(x, spec(symmetric=False, granularity=PerGroup(16)))
    assert got.shape == x.shape
    torch.testing.assert_close(got.reshape(8, 64), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("granularity", "scale_shape"),
    [
        (PerTensor(), (1, 1)),
        (PerRow(), (8, 1)),
        (PerColumn(), (1, 64)),
        (PerGroup(16), (8, 4)),
        (PerGroup(4, "output"), (2, 64)),
    ],
    ids=str,
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_shape_follows_granularity(granularity, scale_shape, symmetric):
    qp = compute_qparams(torch.randn(8, 64), spec(symmetric=symmetric, granularity=granularity))
    assert qp.scale.shape == scale_shape
    assert qp.zero_point.shape == scale_shape
    assert qp.scale.dtype == torch.float32
    assert granularity.scale_shape(8, 64) == scale_shape
    if symmetric:
        assert torch.all(qp.zero_point == 0)


def test_outlier_column_hurts_per_tensor_but_not_per_column():
    x = torch.randn(32, 64)
    x[:, 5] *= 1000
    others = torch.arange(64) != 5

    def error_on_others(granularity):
        y = fake_quantize(x, spec(granularity=granularity))
        return ((y - x)[:, others].norm() / x[:, others].norm()).item()

    assert error_on_others(PerColumn()) < 0.2
    assert error_on_others(PerTensor()) > 0.9


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerColumn(), PerGroup(4, "output")], ids=str)
def test_constant_columns_are_reproduced(symmetric, granularity):
    x = torch.randn(8, 64)
    x[:, 0] = 3.0
    x[:, 1] = -2.0
    x[:, 2] = 0.0
    y = fake_quantize(x, spec(symmetric=symmetric, granularity=granularity))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, :3], x[:, :3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerRow(), PerGroup(16)], ids=str)
def test_constant_rows_are_reproduced(symmetric, granularity):
    x = torch.randn(8, 64)
    x[0] = 0.7
    x[1] = -5.0
    x[2] = 0.0
    y = fake_quantize(x, spec(symmetric=symmetric, granularity=granularity))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:3], x[:3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
def test_all_zeros_give_exact_zeros(method, symmetric, granularity):
    x = torch.zeros(8, 64)
    s = spec(symmetric=symmetric, granularity=granularity, range_method=method, mse_grid=10)
    qp = compute_qparams(x, s)
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
    y = fake_quantize(x, s)
    assert torch.equal(y, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(4, 16)
    x[1, 3] = bad
    with pytest.raises(NonFiniteError, match="NaN/inf.*1 (NaN|inf)"):
        compute_qparams(x, spec())
    with pytest.raises(NonFiniteError):
        fake_quantize(x, spec())
    qp = compute_qparams(torch.randn(4, 16), spec())
    with pytest.raises(NonFiniteError):
        quantize(x, qp, spec())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_codes_stay_in_range_with_stated_dtype(symmetric, bits):
    s = spec(bits=bits, symmetric=symmetric, granularity=PerGroup(16))
    x = torch.randn(16, 64) * 5
    codes = quantize(x, compute_qparams(x, s), s)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert codes.shape == x.shape
    assert s.qmin <= codes.int().min() and codes.int().max() <= s.qmax
    if symmetric:
        assert codes.int().abs().max() == s.qmax
    else:
        assert codes.int().min() == 0 and codes.int().max() == s.qmax


def test_qmin_qmax():
    assert (spec(bits=4).qmin, spec(bits=4).qmax) == (-8, 7)
    assert (spec(bits=8, symmetric=False).qmin, spec(bits=8, symmetric=False).qmax) == (
        0,
        255,
    )


def test_8bit_asymmetric_codes_reach_255():
    x = torch.linspace(-1.0, 3.0, 1024).reshape(4, 256)
    s = spec(bits=8, symmetric=False, granularity=PerTensor())
    codes = quantize(x, compute_qparams(x, s), s)
    assert codes.dtype == torch.uint8
    assert codes.max().item() == 255 and codes.min().item() == 0


def gaussian_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=g)
    idx = torch.randint(0, x.numel(), (40,), generator=g)
    x.view(-1)[idx] *= 25
    return x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerTensor(), PerRow(), PerGroup(64)], ids=str)
def test_mse_range_is_never_worse_than_minmax(symmetric, granularity):
    x = gaussian_with_outliers()
    minmax = spec(symmetric=symmetric, granularity=granularity)
    mse = spec(symmetric=symmetric, granularity=granularity, range_method="mse", mse_grid=10)
    blocks = granularity.scale_shape(*x.shape)

    def block_sse(s):
        sq = (fake_quantize(x, s) - x).square()
        return sq.reshape(blocks[0], -1, blocks[1], x.shape[1] // blocks[1]).sum(dim=(1, 3))

    assert torch.all(block_sse(mse) <= block_sse(minmax) * (1 + 1e-6))
    assert quantization_error(x, mse) < quantization_error(x, minmax)


def test_mse_chooses_the_ratio_per_block():
    x = torch.randn(2, 1050, generator=torch.Generator().manual_seed(3))
    x[0, 0] = 8.0
    x[1] = torch.arange(-7.0, 8.0).repeat(70) * 0.25
    minmax = compute_qparams(x, spec())
    mse = compute_qparams(x, spec(range_method="mse", mse_grid=20))
    assert mse.scale[0, 0] < 0.8 * minmax.scale[0, 0]
    assert mse.scale[1, 0] == minmax.scale[1, 0] == 0.25


def test_mse_with_single_ratio_equals_minmax():
    x = gaussian_with_outliers()
    s = spec(range_method="mse", mse_grid=1)
    torch.testing.assert_close(fake_quantize(x, s), fake_quantize(x, spec()), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_clips_outliers_on_both_sides(symmetric):
    x = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    x[0, 7] = 1000.0
    x[0, 8] = -1000.0
    others = torch.arange(1000) >= 9

    def error_on_others(s):
        y = fake_quantize(x, s)
        return y, ((y - x)[0, others].norm() / x[0, others].norm()).item()

    minmax = spec(bits=8, symmetric=symmetric, granularity=PerTensor())
    clipped = spec(
        bits=8,
        symmetric=symmetric,
        granularity=PerTensor(),
        range_method="percentile",
        percentile=99.8,
    )
    y, err = error_on_others(clipped)
    assert y[0, 7:9].abs().max() <= 1.01 * x[0, others].abs().max()
    assert err < 0.05
    assert error_on_others(minmax)[1] > 0.5


def test_rounding_is_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.0]])
    s = spec(granularity=PerTensor())
    codes = quantize(x, compute_qparams(x, s), s)
    assert codes.tolist() == [[0, 2, 2, 0, -2, -2, 7]]


def test_percentile_100_equals_minmax():
    x = gaussian_with_outliers()
    for symmetric in (True, False):
        p100 = spec(symmetric=symmetric, range_method="percentile", percentile=100.0)
        assert torch.equal(fake_quantize(x, p100), fake_quantize(x, spec(symmetric=symmetric)))


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(QuantConfigError, match=rf"bits must be an integer in 2\.\.8, got {bits}"):
        QuantSpec(bits, True, PerRow())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"percentile": 0.0},
        {"percentile": 100.5},
        {"range_method": "entropy"},
        {"mse_grid": 0},
        {"mse_min_ratio": 0.0},
        {"granularity": "channel"},
    ],
)
def test_bad_spec_settings_are_rejected(kwargs):
    with pytest.raises(QuantConfigError):
        spec(**{"granularity": PerRow(), **kwargs})


def test_group_size_not_dividing_names_the_numbers():
    with pytest.raises(
        QuantConfigError,
        match="group size 128 does not divide 576 input channels; use a divisor such as 64 or 32",
    ):
        compute_qparams(torch.randn(4, 576), spec(granularity=PerGroup(128)))
    with pytest.raises(QuantConfigError, match="group size 3 does not divide 8 output channels"):
        PerGroup(3, "output").block_shape(8, 64)


@pytest.mark.parametrize("args", [(0,), (-4,), (16, "sideways")])
def test_bad_group_is_rejected(args):
    with pytest.raises(QuantConfigError):
        PerGroup(*args)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tensor", PerTensor()),
        ("channel", PerRow()),
        ("row", PerRow()),
        ("token", PerRow()),
        ("input_channel", PerColumn()),
        ("column", PerColumn()),
    ],
)
def test_granularity_names(name, expected):
    assert granularity_from_name(name) == expected


def test_group_granularity_name():
    assert granularity_from_name("group", 128) == PerGroup(128)
    assert granularity_from_name("group", 64, along="output") == PerGroup(64, "output")
    with pytest.raises(QuantConfigError, match="group_size"):
        granularity_from_name("group")
    with pytest.raises(QuantConfigError, match="only used with granularity 'group'"):
        granularity_from_name("channel", 128)


def test_unknown_granularity_name_lists_valid_names():
    with pytest.raises(QuantConfigError, match="unknown granularity 'block'.*channel.*group"):
        granularity_from_name("block")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
def test_round_trip_equals_fake_quantize(symmetric, granularity):
    x = torch.randn(8, 64) * 2
    s = spec(bits=3, symmetric=symmetric, granularity=granularity)
    qp = compute_qparams(x, s)
    y = dequantize(quantize(x, qp, s), qp, s)
    assert torch.equal(y, fake_quantize(x, s, qp))
    assert torch.equal(y, fake_quantize(x, s))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_fake_quantize_is_idempotent_with_same_qparams(symmetric, method):
    x = gaussian_with_outliers()
    s = spec(symmetric=symmetric, granularity=PerGroup(32), range_method=method, mse_grid=10)
    qp = compute_qparams(x, s)
    y = fake_quantize(x, s, qp)
    assert torch.equal(fake_quantize(y, s, qp), y)


def test_dtype_and_shape_are_preserved():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = fake_quantize(x, spec(granularity=PerGroup(32)))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    qp = compute_qparams(x, spec())
    out = dequantize(quantize(x, qp, spec()), qp, spec(), dtype=torch.float16)
    assert out.dtype == torch.float16


def test_mismatched_qparams_are_rejected():
    qp = QParams(torch.ones(4, 1), torch.zeros(4, 1))
    with pytest.raises(QuantConfigError, match="does not match"):
        quantize(torch.randn(8, 16), qp, spec())


def test_quantization_error_of_zeros_is_zero():
    assert quantization_error(torch.zeros(4, 8), spec()) == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_from_range_matches_minmax(symmetric):
    x = torch.randn(8, 64)
    s = spec(symmetric=symmetric, granularity=PerColumn())
    qp = qparams_from_range(x.amin(dim=0, keepdim=True), x.amax(dim=0, keepdim=True), s)
    expected = compute_qparams(x, s)
    assert torch.equal(qp.scale, expected.scale)
    assert torch.equal(qp.zero_point, expected.zero_point)


def reference_clipped_fake_quant(x, bits, symmetric, ratio):
    """Per-row loop: the min-max range times ``ratio``, then the textbook formulas."""
    out = torch.empty_like(x)
    for i, row in enumerate(x):
        if symmetric:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            scale = row.abs().max() * ratio / qmax
            zero = torch.tensor(0.0)
        else:
            qmin, qmax = 0, 2**bits - 1
            lo = torch.minimum(row.min() * ratio, torch.tensor(0.0))
            hi = torch.maximum(row.max() * ratio, torch.tensor(0.0))
            scale = (hi - lo) / qmax
        scale = scale if scale > 0 else torch.tensor(1.0)
        if not symmetric:
            zero = torch.clamp(torch.round(-lo / scale), qmin, qmax)
        out[i] = (torch.clamp(torch.round(row / scale) + zero, qmin, qmax) - zero) * scale
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("case", ["random", "outliers", "constant", "zeros"])
def test_clip_ratio_matches_reference(symmetric, case):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=gen)
    if case == "outliers":
        x[:, 3] *= 80.0
    elif case == "constant":
        x[2] = 1.5
    elif case == "zeros":
        x[1] = 0.0
    q = fake_quantize(x, spec(4, symmetric, PerRow(), clip_ratio=0.9))
    torch.testing.assert_close(q, reference_clipped_fake_quant(x, 4, symmetric, 0.9))
    assert not torch.equal(q, fake_quantize(x, spec(4, symmetric, PerRow())))


def test_clip_ratio_one_is_plain_minmax_and_nan_is_still_refused():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(fake_quantize(x, spec(clip_ratio=1.0)), fake_quantize(x, spec()))
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        fake_quantize(x, spec(clip_ratio=0.9))


@pytest.mark.parametrize(
    "kwargs",
    [{"clip_ratio": 0.0}, {"clip_ratio": 1.5}, {"clip_ratio": 0.9, "range_method": "mse"}],
)
def test_bad_clip_ratio_is_rejected(kwargs):
    with pytest.raises(QuantConfigError):
        spec(**kwargs)


def reference_float_min_fake_quant(x, bits, block_rows, block_cols, half_scales):
    """Block loop with a float minimum: ``q = round((x − lo)/s)``, value ``q·s + lo``."""
    out = torch.empty_like(x)
    qmax = 2**bits - 1
    for i in range(0, x.shape[0], block_rows):
        for j in range(0, x.shape[1], block_cols):
            block = x[i : i + block_rows, j : j + block_cols]
            lo, hi = block.min(), block.max()
            scale = (hi - lo) / qmax
            if half_scales:
                scale, lo = scale.half().float(), lo.half().float()
            if scale == 0:
                scale = torch.tensor(1.0)
            q = torch.clamp(torch.round((block - lo) / scale), 0, qmax)
            out[i : i + block_rows, j : j + block_cols] = q * scale + lo
    return out


def adversarial(case: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 64, generator=gen)
    if case == "offset":  # a channel far from zero: the float minimum's reason to exist
        x = x + 40.0
    elif case == "outliers":
        x[2, 5], x[6, 17] = 300.0, -150.0
    elif case == "constant":
        x[:, :16] = 2.5
        x[3] = -1.25
    elif case == "zeros":
        x = torch.zeros(8, 64)
    return x


@pytest.mark.parametrize("case", ["random", "offset", "outliers", "constant", "zeros"])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("half", [False, True], ids=["f32", "f16"])
def test_float_minimum_matches_loop_reference(case, granularity, half):
    x = adversarial(case)
    s = spec(
        bits=2 if case == "offset" else 4,
        symmetric=False,
        granularity=granularity,
        zero_point="float",
        scale_dtype="float16" if half else "float32",
    )
    expected = reference_float_min_fake_quant(
        x, s.bits, *granularity.block_shape(8, 64), half_scales=half
    )
    torch.testing.assert_close(fake_quantize(x, s), expected, rtol=0, atol=1e-5)
    qp = compute_qparams(x, s)
    codes = quantize(x, qp, s)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**s.bits - 1
    assert torch.equal(dequantize(codes, qp, s), fake_quantize(x, s))


def test_float_minimum_beats_integer_zero_on_an_offset_channel():
    x = adversarial("offset")
    integer = spec(bits=2, symmetric=False, granularity=PerColumn())
    floating = spec(bits=2, symmetric=False, granularity=PerColumn(), zero_point="float")
    assert quantization_error(x, floating) < 0.5 * quantization_error(x, integer)


@pytest.mark.parametrize("symmetric", [True, False])
def test_float16_scales_are_float16_values(symmetric):
    x = gaussian_with_outliers()
    s = spec(symmetric=symmetric, granularity=PerGroup(32), scale_dtype="float16")
    qp = compute_qparams(x, s)
    assert qp.scale.dtype == torch.float32
    assert torch.equal(qp.scale.half().float(), qp.scale)
    assert torch.equal(dequantize(quantize(x, qp, s), qp, s), fake_quantize(x, s))


def test_float16_scales_reject_ranges_they_cannot_hold():
    x = torch.full((2, 32), 1e6)
    x[0, 0] = -1e6
    with pytest.raises(QuantConfigError, match="float16 scales"):
        compute_qparams(x, spec(bits=2, granularity=PerRow(), scale_dtype="float16"))


def test_float_minimum_rejects_nan():
    x = adversarial("random")
    x[1, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        fake_quantize(x, spec(symmetric=False, zero_point="float"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"zero_point": "float", "symmetric": True},
        {"zero_point": "fractional"},
        {"scale_dtype": "bfloat16"},
    ],
)
def test_bad_zero_point_or_scale_dtype_is_rejected(kwargs):
    with pytest.raises(QuantConfigError):
        QuantSpec(**{"bits": 4, "symmetric": False, "granularity": PerRow(), **kwargs})


def sorted_rows(n: int, cols: int) -> torch.Tensor:
    """Token rows whose scale grows with the row index: a sample of the first (or every k-th
    few) rows would see another distribution than the whole."""
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(0))
    return x * torch.linspace(0.1, 3.0, n)[:, None]


def test_calibration_sample_leaves_few_rows_alone():
    rows = torch.randn(100, 8)
    assert calibration_sample(rows, limit=800) is rows
    assert calibration_sample(rows, limit=8) is rows  # under CALIBRATION_MIN_ROWS


def test_calibration_sample_without_a_row_floor_is_bounded_by_values():
    rows = torch.randn(5000, 4096)  # long rows: the log softmax quantizers' quantile needs few
    sample = calibration_sample(rows, min_rows=1)
    assert sample.shape == (CALIBRATION_SAMPLE // 4096 + 2, 4096)


@pytest.mark.parametrize("granularity", [PerTensor(), PerColumn()], ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_calibration_sample_keeps_every_columns_extremes(granularity, symmetric):
    rows = sorted_rows(40_000, 16)
    rows[123, 5], rows[7, 9] = 50.0, -40.0  # single outliers the random rows may miss
    sample = calibration_sample(rows, limit=16 * CALIBRATION_MIN_ROWS)
    assert sample.shape == (CALIBRATION_MIN_ROWS + 2, 16)
    torch.testing.assert_close(sample.amax(0), rows.amax(0), rtol=0, atol=0)
    torch.testing.assert_close(sample.amin(0), rows.amin(0), rtol=0, atol=0)
    assert torch.equal(sample, calibration_sample(rows, limit=16 * CALIBRATION_MIN_ROWS))
    minmax = spec(4, symmetric, granularity)
    full, sampled = compute_qparams(rows, minmax), compute_qparams(sample, minmax)
    torch.testing.assert_close(sampled.scale, full.scale, rtol=0, atol=0)
    torch.testing.assert_close(sampled.zero_point, full.zero_point, rtol=0, atol=0)


def test_mse_search_on_the_sample_is_as_good_as_on_all_rows():
    u = torch.rand(66_560, 16, generator=torch.Generator().manual_seed(0)) - 0.5
    rows = -u.sign() * torch.log1p(-2 * u.abs())  # Laplace; as many rows as 1,024 DINOv2 images
    s = spec(4, False, PerColumn(), range_method="mse")
    sample = calibration_sample(rows, limit=16 * CALIBRATION_MIN_ROWS)
    assert sample.shape[0] == CALIBRATION_MIN_ROWS + 2

    def error(qparams):  # per column, on all rows
        return (fake_quantize(rows, s, qparams) - rows).square().sum(0)

    best = error(compute_qparams(rows, s))
    assert (error(compute_qparams(sample, s)) <= best * 1.03).all()
    few = torch.cat([rows[:1024], rows.amin(0, keepdim=True), rows.amax(0, keepdim=True)])
    assert (error(compute_qparams(few, s)) > best * 1.03).any(), "a too small sample shows"


def test_only_the_mse_search_reads_a_sample():
    rows = sorted_rows(20_000, 64)  # over CALIBRATION_MIN_ROWS, CALIBRATION_SAMPLE // 64 rows
    assert calibration_sample(rows).shape[0] < rows.shape[0]
    for method in ("minmax", "percentile"):
        s = spec(4, False, PerColumn(), range_method=method)
        full, static = compute_qparams(rows, s), static_qparams(rows, s)
        assert torch.equal(static.scale, full.scale) and torch.equal(
            static.zero_point, full.zero_point
        )
    s = spec(4, False, PerColumn(), range_method="mse")
    assert torch.equal(
        static_qparams(rows, s).scale, compute_qparams(calibration_sample(rows), s).scale
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_static_qparams_sees_a_non_finite_row_the_sample_skips(bad):
    rows = torch.randn(50_000, 8)
    rows[31_337, 2] = bad
    with pytest.raises(NonFiniteError):
        static_qparams(rows, spec(8, False, PerTensor(), range_method="mse"))
