"""Specification of the CPU linear kernels: W8A16, W4A16 (AVX-512 extension) and W8A8 (_int_mm).

Every kernel is checked against a plain float64 reference (codes de-quantized by hand, then
``x @ W.T + b``). Tolerance: an fp32 dot product of K terms, summed in any order, is within
``γ_K · Σ_k |x_k w_k|`` of the exact sum, ``γ_K ≈ K · 2⁻²⁴`` (Higham, Accuracy and Stability,
§3.1); de-quantizing a weight adds one rounding, so we allow ``(K + 2) · 2⁻²⁴ · Σ|x w|`` per
output, plus 1e-30 for exact zeros. A wrong code, nibble or scale errs by ~|x_k w_k| ≫ that.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from channelwise.kernels import (
    KernelInputError,
    cpu,
    extension,
    half_weight_linear,
    kernel_available,
    reference,
    unpack_int4,
    w4a16_linear,
    w4a16_reference,
    w8a8_linear,
    w8a8_reference,
    w8a16_linear,
    w8a16_reference,
)

EPS32 = 2.0**-24
M_VALUES = [1, 2, 3, 5, 17, 512]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_dot_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
    """``got`` ≈ ``x @ w.T + bias`` in float64, within the fp32 summation bound above."""
    x64, w64 = x.double(), w.double()
    expected = x64 @ w64.T + (0 if bias is None else bias.double())
    bound = x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs())
    bound = bound * (x.shape[-1] + 2) * EPS32 + 1e-30
    assert got.dtype == torch.float32 and got.shape == expected.shape
    excess = (got.double() - expected).abs() - bound
    assert (excess <= 0).all(), f"max excess over the bound: {excess.max().item():.3g}"


def w4_dense(codes: torch.Tensor, scale, zero, group: int) -> torch.Tensor:
    """Loop-free but independent de-quantization: repeat each group's scale/zero over columns."""
    s = scale.double().repeat_interleave(group, dim=1)
    z = zero.double().repeat_interleave(group, dim=1)
    return (codes.double() - z) * s


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """The shared layout, written out: byte j = code 2j | code 2j+1 << 4."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()


def random_w4(out: int, inp: int, group: int, seed: int):
    g = gen(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    scale = torch.rand(out, inp // group, generator=g) * 0.1 + 1e-3
    zero = torch.rand(out, inp // group, generator=g) * 15
    return codes, scale, zero


# ----------------------------------------------------------------------------- pure-torch parts
def test_unpack_int4_follows_the_shared_layout():
    packed = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)
    assert unpack_int4(packed).tolist() == [[1, 2, 0, 15]]


def test_w4_reference_matches_hand_dequantization():
    codes, scale, zero = random_w4(9, 128, 64, seed=0)
    x = torch.randn(4, 128, generator=gen(1))
    got = w4a16_reference(x, pack_int4(codes), scale, zero, 64)
    assert_dot_close(got, x, w4_dense(codes, scale, zero, 64))


def test_w8a8_reference_is_the_integer_product_of_quantized_operands():
    x = torch.randn(5, 64, generator=gen(2)) * 3
    w = torch.randint(-127, 128, (7, 64), generator=gen(3), dtype=torch.int8)
    w_scale = torch.rand(7, generator=gen(4))
    x_scale = x.abs().amax(1, keepdim=True).double() / 127
    xq = torch.round(x.double() / x_scale).clamp(-127, 127)
    expected = (xq @ w.double().T) * x_scale * w_scale.double()
    torch.testing.assert_close(w8a8_reference(x, w, w_scale).double(), expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- weight-only
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("out", [64, 37])
def test_w8a16_matches_float_reference(m, out):
    g = gen(m * 100 + out)
    x = torch.randn(m, 576, generator=g)
    w = torch.randint(-127, 128, (out, 576), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(out, generator=g) * 0.01, torch.randn(out, generator=g)
    got = w8a16_linear(x, w, scale, bias)
    assert_dot_close(got, x, w.double() * scale.double()[:, None], bias)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize(("out", "group"), [(64, 64), (37, 64), (33, 32), (20, 128), (9, 16)])
def test_w4a16_matches_float_reference(m, out, group):
    codes, scale, zero = random_w4(out, 256, group, seed=m + out)
    x = torch.randn(m, 256, generator=gen(m))
    bias = torch.randn(out, generator=gen(out))
    got = w4a16_linear(x, pack_int4(codes), scale, zero, group, bias)
    assert_dot_close(got, x, w4_dense(codes, scale, zero, group), bias)


HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize(("out", "inp"), [(64, 576), (37, 45), (9, 16)])
def test_half_weight_matches_float_reference(dtype, m, out, inp):
    g = gen(m * 1000 + out + inp)
    x = torch.randn(m, inp, generator=g)
    w = torch.randn(out, inp, generator=g).to(dtype)
    bias = torch.randn(out, generator=g)
    assert_dot_close(half_weight_linear(x, w, bias), x, w.double(), bias)
    assert_dot_close(half_weight_linear(x, w), x, w.double())


@pytest.mark.parametrize("dtype", HALF)
def test_half_weight_extreme_values_widen_exactly(dtype):
    info = torch.finfo(dtype)
    values = torch.tensor(
        [info.max, -info.max, info.tiny, info.smallest_normal / 4, -0.0, 0.0, 1.0]
    )
    w = values.repeat(5, 5)[:, :33].to(dtype).contiguous()  # subnormals, signed zeros, the max
    x = torch.zeros(2, 33)
    for column in range(33):
        x.zero_()
        x[:, column] = 1.0  # y picks one weight column: exact whatever the summation order
        assert torch.equal(half_weight_linear(x, w), w.float()[:, column].expand(2, -1))


def test_half_weight_kernel_runs():
    if not kernel_available():
        pytest.skip("no AVX-512 kernels here: widen + F.linear serves, by design")
    x, w = torch.randn(1, 64, generator=gen(81)), torch.ones(8, 64, dtype=torch.float16)
    with torch.profiler.profile() as profile:
        half_weight_linear(x, w)
    assert "channelwise_cpu::half_mm" in {e.key for e in profile.key_averages()}


def test_w8a16_odd_in_features_use_the_masked_tail():
    x = torch.randn(3, 45, generator=gen(5))
    w = torch.randint(-128, 128, (19, 45), generator=gen(6), dtype=torch.int8)
    scale = torch.rand(19, generator=gen(7))
    assert_dot_close(w8a16_linear(x, w, scale), x, w.double() * scale.double()[:, None])


@pytest.mark.parametrize("case", ["zero_x", "codes_min", "codes_max", "outlier"])
@pytest.mark.parametrize("m", [1, 17])
def test_weight_only_adversarial_inputs(case, m):
    x = torch.randn(m, 128, generator=gen(8))
    codes4, scale4, zero4 = random_w4(13, 128, 64, seed=9)
    codes8 = torch.randint(-127, 128, (13, 128), generator=gen(10), dtype=torch.int8)
    if case == "zero_x":
        x.zero_()
    elif case == "codes_min":
        codes4.fill_(0)
        codes8.fill_(-128)
    elif case == "codes_max":
        codes4.fill_(15)
        codes8.fill_(127)
    else:
        x[:, 77] = 1e4  # one channel far above the rest
    scale8 = torch.rand(13, generator=gen(11))
    got8 = w8a16_linear(x, codes8, scale8)
    assert_dot_close(got8, x, codes8.double() * scale8.double()[:, None])
    got4 = w4a16_linear(x, pack_int4(codes4), scale4, zero4, 64)
    assert_dot_close(got4, x, w4_dense(codes4, scale4, zero4, 64))
    if case == "zero_x":
        assert (got8 == 0).all() and (got4 == 0).all()


def test_leading_dims_are_flattened_and_restored():
    x = torch.randn(2, 3, 64, generator=gen(12))
    codes, scale, zero = random_w4(8, 64, 32, seed=13)
    got = w4a16_linear(x, pack_int4(codes), scale, zero, 32)
    assert got.shape == (2, 3, 8)
    torch.testing.assert_close(got[1], w4a16_reference(x[1], pack_int4(codes), scale, zero, 32))


def test_kernel_is_built_on_an_avx512_host():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        pytest.skip("no AVX-512 here: the pure-torch path is the design")
    if os.environ.get("CHANNELWISE_KERNELS") == "0":
        pytest.skip("kernels disabled by CHANNELWISE_KERNELS=0")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}): the pure-torch path serves, by design")
    assert kernel_available()
    assert (cpu._ops() is not None) and hasattr(cpu._ops(), "w4a16_mm")


def test_building_again_in_the_same_process_still_serves(monkeypatch):
    # the ops' shape functions (for torch.compile) can be registered once per process only
    if not kernel_available():
        pytest.skip("no kernels here")
    monkeypatch.setattr(extension, "_state", {})
    assert extension.load_ops() is not None
    x = torch.randn(2, 64, generator=gen(16))
    codes, scale, zero = random_w4(8, 64, 64, seed=17)
    assert_dot_close(
        w4a16_linear(x, pack_int4(codes), scale, zero, 64), x, w4_dense(codes, scale, zero, 64)
    )


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def broken_build():
        raise RuntimeError("no compiler\ng++: not found")

    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "_build", broken_build)
    x = torch.randn(1, 64, generator=gen(14))
    codes, scale, zero = random_w4(8, 64, 64, seed=15)
    with caplog.at_level(logging.WARNING, logger=extension.__name__):
        got = [w4a16_linear(x, pack_int4(codes), scale, zero, 64) for _ in range(3)]
    assert not kernel_available()
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert_dot_close(got[0], x, w4_dense(codes, scale, zero, 64))


# ----------------------------------------------------------------------------- W8A8
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize(("out", "inp"), [(64, 128), (37, 128), (64, 36)])
def test_w8a8_equals_the_exact_integer_reference(m, out, inp):
    g = gen(m + out + inp)
    x = torch.randn(m, inp, generator=g)
    x[0, 3] = 500.0  # an outlier sets token 0's scale
    w = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(out, generator=g), torch.randn(out, generator=g)
    got = w8a8_linear(x, w, w_scale, bias)
    assert torch.equal(got, w8a8_reference(x, w, w_scale, bias))  # int32 sums are exact


def test_exact_int_matmul_without_integer_matmul_is_exact():
    # CUDA has no integer matmul: the W8A8 reference sums in float64 there. Worst-case
    # magnitudes (|x| = 128, |w − z| = 255) over a long row stay exact.
    a = torch.full((3, 8192), -128, dtype=torch.int8)
    a[1] = torch.randint(-128, 128, (8192,), generator=gen(90), dtype=torch.int8)
    b = torch.full((8192, 5), 255, dtype=torch.int32)
    b[:, 1] = -255
    b[:, 2] = torch.randint(-255, 256, (8192,), generator=gen(91), dtype=torch.int32)
    expected = a.to(torch.int32) @ b
    assert torch.equal(reference._int_matmul_in_float64(a, b), expected)
    assert torch.equal(reference.exact_int_matmul(a, b), expected)


@pytest.mark.parametrize("m", [1, 17, 300])
@pytest.mark.parametrize(("x_scale", "asymmetric"), [(None, False), (0.03, True)])
def test_w8a8_without_the_extension_is_the_torch_path_cuda_runs(
    m, x_scale, asymmetric, monkeypatch
):
    # On CUDA w8a8_linear runs torch's quantizers, torch._int_mm and a torch de-quantize: the
    # same code as on a CPU without the extension, checked here bit for bit.
    monkeypatch.setattr(cpu, "_ops", lambda: None)
    g = gen(92 + m)
    x = torch.randn(m, 96, generator=g)
    if asymmetric:
        w = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8)
        zero = torch.randint(-20, 20, (40,), generator=g, dtype=torch.int32)
    else:
        w, zero = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8), None
    scale, bias = torch.rand(40, generator=g) * 0.01, torch.randn(40, generator=g)
    got = w8a8_linear(x, w, scale, bias, x_scale, zero)
    assert torch.equal(got, w8a8_reference(x, w, scale, bias, x_scale, zero))


def test_w8a8_zero_token_and_extreme_codes():
    x = torch.randn(17, 64, generator=gen(16))
    x[5] = 0
    w = torch.full((16, 64), 127, dtype=torch.int8)
    w[::2] = -127
    got = w8a8_linear(x, w, torch.ones(16))
    assert (got[5] == 0).all()
    assert torch.equal(got, w8a8_reference(x, w, torch.ones(16)))
    # and the quantization error is that of 8-bit per-token activations
    exact = x.double() @ w.double().T
    err = (got.double() - exact).abs().amax(1)
    assert (err <= x.abs().amax(1).double() / 127 / 2 * 127 * 64 + 1e-9).all()


def test_w8a8_reuses_the_codes_of_one_unchanged_input_only():
    # q/k/v read one tensor: its codes are computed once; an in-place write or another tensor
    # with the same values must not be served stale codes.
    x = torch.randn(20, 64, generator=gen(30))
    w = torch.randint(-127, 128, (16, 64), generator=gen(31), dtype=torch.int8)
    first = w8a8_linear(x, w, torch.ones(16))
    assert torch.equal(w8a8_linear(x, w, torch.ones(16)), first)
    x.mul_(3.0)  # same object, new version
    assert torch.equal(w8a8_linear(x, w, torch.ones(16)), w8a8_reference(x, w, torch.ones(16)))
    x[:, :32] = 0  # a view write: same version counter
    assert torch.equal(w8a8_linear(x, w, torch.ones(16)), w8a8_reference(x, w, torch.ones(16)))
    other = torch.randn(20, 64, generator=gen(32))
    assert torch.equal(
        w8a8_linear(other, w, torch.ones(16)), w8a8_reference(other, w, torch.ones(16))
    )


@pytest.mark.parametrize("m", [1, 5, 17, 300])
def test_static_int8_input_equals_the_fake_quantizer_codes(m):
    # OutlierTune / DGQ: one calibrated scale; values beyond its range clamp to −128…127.
    from channelwise.quant import PerTensor, QParams, QuantSpec, quantize

    x = torch.randn(m, 96, generator=gen(40)) * 2
    x[0, 5], x[-1, 7] = 1e3, -1e3  # saturate both ends
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerTensor())
    scale = 0.0173
    expected = quantize(x, QParams(torch.tensor([[scale]]), torch.zeros(1, 1)), spec)
    torch_codes, column = cpu.quantize_static(x, scale)
    assert torch.equal(torch_codes, expected) and (column == scale).all()
    if cpu.kernel_available():
        codes, column = cpu._ops().quantize_static(x, scale)
        assert torch.equal(codes, expected) and (column == scale).all()
    w = torch.randint(-127, 128, (24, 96), generator=gen(41), dtype=torch.int8)
    w_scale, bias = torch.rand(24, generator=gen(42)), torch.randn(24, generator=gen(43))
    got = w8a8_linear(x, w, w_scale, bias, x_scale=scale)
    assert torch.equal(got, w8a8_reference(x, w, w_scale, bias, x_scale=scale))
    exact = (expected.double() * scale) @ (w.double() * w_scale.double()[:, None]).T
    torch.testing.assert_close(got.double(), exact + bias.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 17, 64])
@pytest.mark.parametrize("x_scale", [None, 0.02])
def test_w8a8_with_weight_zero_points_is_exact(m, x_scale):
    # Asymmetric 8-bit weights (OutlierTune's): codes q ∈ 0…255 stored as q − 128, zero z − 128.
    g = gen(50 + m)
    x = torch.randn(m, 64, generator=g)
    q = torch.randint(0, 256, (32, 64), generator=g)
    q[0] = 255  # extreme codes and zero points
    z = torch.randint(0, 256, (32,), generator=g)
    z[1] = 0
    w, w_zero = (q - 128).to(torch.int8), (z - 128).to(torch.int32)
    w_scale, bias = torch.rand(32, generator=g), torch.randn(32, generator=g)
    got = w8a8_linear(x, w, w_scale, bias, x_scale=x_scale, w_zero=w_zero)
    assert torch.equal(got, w8a8_reference(x, w, w_scale, bias, x_scale, w_zero))
    xq, column = cpu.quantize_per_token(x) if x_scale is None else cpu.quantize_static(x, x_scale)
    exact = (xq.double() * column.double()) @ (
        (q - z[:, None]).double() * w_scale.double()[:, None]
    ).T
    torch.testing.assert_close(got.double(), exact + bias.double(), rtol=1e-5, atol=1e-4)
    with pytest.raises(KernelInputError, match="w_zero"):
        w8a8_linear(x, w, w_scale, w_zero=w_zero.to(torch.int64))


@pytest.mark.parametrize("m", [1, 5, 17, 300])
@pytest.mark.parametrize("x_scale", [None, 0.03])
def test_w8a8_on_the_prepacked_onednn_weight_equals_the_reference(m, x_scale):
    from channelwise.kernels import prepack_int8

    g = gen(60 + m)
    x = torch.randn(m, 96, generator=g)
    x[0, 1] = 40.0
    w = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(40, generator=g), torch.randn(40, generator=g)
    packed = prepack_int8(w)
    if packed is None:
        pytest.skip("this torch has no oneDNN int8 linear")
    for b in (None, bias):
        got = w8a8_linear(x, w, w_scale, b, x_scale=x_scale, w_packed=packed)
        assert torch.equal(got, w8a8_reference(x, w, w_scale, b, x_scale))
    with pytest.raises(KernelInputError, match="w_packed"):  # another weight's packing
        w8a8_linear(x, w[:32], w_scale[:32], w_packed=packed)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 17])
@pytest.mark.parametrize(("out", "inp"), [(40, 96), (37, 130), (5, 64), (576, 1536)])
@pytest.mark.parametrize("x_scale", [None, 0.03])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_w8a8_small_m_kernel_on_the_stored_codes_equals_the_reference(
    m, out, inp, x_scale, asymmetric
):
    # Decode: up to SMALL_M tokens multiply the codes as packed modules store them (unsigned,
    # w + zero) by the int8 activations with VNNI; the int32 sums and float steps are the
    # reference's, so the result is bit-identical (K tails, odd row counts, both zero kinds).
    from channelwise.kernels import unsigned_codes

    g = gen(70 + m + out + inp)
    x = torch.randn(m, inp, generator=g) * 3
    x[0, 1] = 40.0
    q = torch.randint(0, 256, (out, inp), generator=g)
    q[0] = 255
    if asymmetric:
        z = torch.randint(0, 256, (out,), generator=g)
        w, w_zero = (q - 128).to(torch.int8), (z - 128).to(torch.int32)
        unsigned = unsigned_codes(q.to(torch.uint8), z.to(torch.uint8))
    else:
        q = q.clamp(1, 255)  # symmetric codes −127…127, stored + 128
        w, w_zero = (q - 128).to(torch.int8), None
        unsigned = unsigned_codes(q.to(torch.uint8))
    w_scale, bias = torch.rand(out, generator=g), torch.randn(out, generator=g)
    for b in (None, bias):
        got = w8a8_linear(x, w, w_scale, b, x_scale, w_zero, w_unsigned=unsigned)
        assert torch.equal(got, w8a8_reference(x, w, w_scale, b, x_scale, w_zero))
    x[m // 2, 0] = float("nan")  # a non-finite token makes its own row NaN, no other
    got = w8a8_linear(x, w, w_scale, bias, x_scale, w_zero, w_unsigned=unsigned)
    assert got[m // 2].isnan().all()
    assert torch.equal(
        got[: m // 2], w8a8_reference(x, w, w_scale, bias, x_scale, w_zero)[: m // 2]
    )


def test_w8a8_small_m_kernel_runs_where_vnni_is():
    from channelwise.kernels import unsigned_codes

    if not (kernel_available() and extension.vnni_supported()):
        pytest.skip("no AVX-512 VNNI kernels here: oneDNN / _int_mm serve, by design")
    x, w = torch.randn(1, 64, generator=gen(80)), torch.ones(8, 64, dtype=torch.int8)
    unsigned = unsigned_codes((w.view(torch.uint8) ^ 0x80).contiguous())
    with torch.profiler.profile() as profile:
        w8a8_linear(x, w, torch.ones(8), w_unsigned=unsigned)
    assert "channelwise_cpu::w8a8_small_mm" in {e.key for e in profile.key_averages()}


def test_w8a8_small_m_kernel_refuses_codes_of_another_weight():
    from channelwise.kernels import unsigned_codes

    x, w = torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8)
    for bad in (
        unsigned_codes(torch.zeros(8, 32, dtype=torch.uint8)),
        (torch.zeros(8, 64, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64)),
    ):
        with pytest.raises(KernelInputError, match="w_unsigned"):
            w8a8_linear(x, w, torch.ones(8), w_unsigned=bad)


def test_static_int8_input_makes_a_non_finite_token_row_nan():
    x = torch.randn(20, 64, generator=gen(44))
    x[3, 1], x[7, 2] = float("inf"), float("nan")
    w = torch.randint(-127, 128, (16, 64), generator=gen(45), dtype=torch.int8)
    y = w8a8_linear(x, w, torch.ones(16), x_scale=0.05)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[3, 7]] = True
    assert y[bad].isnan().all() and y[~bad].isfinite().all()


@pytest.mark.parametrize("x_scale", [0.0, -1.0, float("inf"), float("nan"), 1])
def test_static_int8_input_rejects_a_bad_scale(x_scale):
    x, w = torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(KernelInputError, match="x_scale"):
        w8a8_linear(x, w, torch.ones(8), x_scale=x_scale)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_kernel_input_error():
    x = torch.randn(2, 64)
    codes, scale, zero = random_w4(8, 64, 32, seed=17)
    p = pack_int4(codes)
    w8 = torch.zeros(8, 64, dtype=torch.int8)
    cases = [
        lambda: w8a16_linear(x.double(), w8, torch.ones(8)),  # wrong x dtype
        lambda: w8a16_linear(x, w8.float(), torch.ones(8)),  # wrong weight dtype
        lambda: w8a16_linear(x, w8, torch.ones(7)),  # scale shape
        lambda: w8a16_linear(x, w8, torch.ones(8), torch.ones(3)),  # bias shape
        lambda: w8a16_linear(torch.randn(2, 63), w8, torch.ones(8)),  # in mismatch
        lambda: w4a16_linear(x, p, scale, zero, 48),  # group does not divide in
        lambda: w4a16_linear(x, p, scale, zero, 3),  # odd group
        lambda: w4a16_linear(x, p, scale[:, :1], zero, 32),  # scale shape
        lambda: w4a16_linear(x, p, scale, zero.double(), 32),  # zero dtype
        lambda: w4a16_linear(x, codes.to(torch.int8), scale, zero, 32),  # unpacked int8 codes
        lambda: w8a8_linear(x, w8, torch.ones(8, 1)),  # w_scale shape
        lambda: w8a8_linear(x.half(), w8, torch.ones(8)),
        lambda: half_weight_linear(x, torch.zeros(8, 64)),  # a float32 weight
        lambda: half_weight_linear(x, torch.zeros(8, 63, dtype=torch.float16)),  # in mismatch
        lambda: half_weight_linear(x, torch.zeros(64, 8, dtype=torch.float16).T),  # strided
        lambda: half_weight_linear(x.half(), torch.zeros(8, 64, dtype=torch.float16)),
        lambda: half_weight_linear(x, torch.zeros(8, 64, dtype=torch.bfloat16), torch.ones(3)),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(KernelInputError):
            case()
            pytest.fail(f"case {i} did not raise")


@pytest.mark.parametrize("m", [1, 17])
def test_nan_in_a_token_makes_only_that_output_row_nan(m):
    x = torch.randn(m + 1, 64, generator=gen(18))
    x[0, 10] = float("nan")
    codes, scale, zero = random_w4(16, 64, 64, seed=19)
    w8 = torch.randint(-127, 128, (16, 64), generator=gen(20), dtype=torch.int8)
    outputs = [
        w8a16_linear(x, w8, torch.ones(16)),
        w4a16_linear(x, pack_int4(codes), scale, zero, 64),
        w8a8_linear(x, w8, torch.ones(16)),
        half_weight_linear(x, torch.randn(16, 64, generator=gen(21)).half()),
    ]
    for y in outputs:
        assert y[0].isnan().all() and y[1:].isfinite().all()


@pytest.mark.parametrize(("out", "group"), [(8, 64), (37, 32), (5, 128)])
def test_prefill_dispatch_is_bit_identical_to_the_references(out, group):
    # Above WEIGHT_ONLY_MAX_M tokens: de-quantize (the extension writes the reference's floats
    # in one pass) + F.linear, so the same numbers as the reference, bit for bit.
    x = torch.randn(cpu.WEIGHT_ONLY_MAX_M + 1, 256, generator=gen(21))
    w8 = torch.randint(-127, 128, (out, 256), generator=gen(22), dtype=torch.int8)
    scale8, bias = torch.rand(out, generator=gen(23)), torch.randn(out, generator=gen(24))
    assert torch.equal(w8a16_linear(x, w8, scale8, bias), w8a16_reference(x, w8, scale8, bias))
    codes, scale, zero = random_w4(out, 256, group, seed=25)
    args = (pack_int4(codes), scale, zero, group, bias)
    assert torch.equal(w4a16_linear(x, *args), w4a16_reference(x, *args))


@pytest.mark.parametrize("case", ["random", "integer_zero", "extreme", "non_finite"])
def test_extension_dequantization_writes_the_reference_floats(case):
    if not kernel_available():
        pytest.skip("no AVX-512 kernels here: the torch de-quantization serves, by design")
    from channelwise.kernels import dequantize_w4, dequantize_w8

    ops = cpu._ops()
    codes, scale, zero = random_w4(19, 192, 64, seed=26)
    w8 = torch.randint(-128, 128, (19, 45), generator=gen(27), dtype=torch.int8)  # masked tail
    scale8 = torch.rand(19, generator=gen(28))
    if case == "integer_zero":
        zero = zero.round()
    elif case == "extreme":
        codes[:3] = 15
        codes[3:6] = 0
        scale[0], zero[1] = 3e38, -1e30  # products overflow to inf in both
        scale8[0] = 3e38
    elif case == "non_finite":
        scale[0, 1], zero[2, 0], scale[4, 2] = float("nan"), float("inf"), 0.0
        scale8[1] = float("nan")
    got4 = ops.dequantize_w4(pack_int4(codes), scale, zero, 64)
    want4 = dequantize_w4(pack_int4(codes), scale, zero, 64)
    assert torch.equal(got4.nan_to_num(), want4.nan_to_num())
    assert torch.equal(got4.isnan(), want4.isnan())
    got8, want8 = ops.dequantize_w8(w8, scale8), dequantize_w8(w8, scale8)
    assert torch.equal(got8.nan_to_num(), want8.nan_to_num())
    assert torch.equal(got8.isnan(), want8.isnan())


def test_compiled_token_quantizer_equals_the_torch_one():
    if not kernel_available():
        pytest.skip("extension not available: the torch quantizer is the only one")
    x = torch.randn(7, 45, generator=gen(23))
    x[1] = 0  # all-zero token: scale 1
    x[2, 0] = 1e6  # outlier
    x[3] = torch.arange(45) - 22.5  # ties: k + 0.5 after scaling by amax/127 hit round-half-even
    x[4] = torch.arange(45) * (127 / 44)
    q, scale = cpu._ops().quantize_per_token(x)
    q_ref, scale_ref = cpu.quantize_per_token(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
