"""Specification of the bit-packing layout: little-endian bit streams per row, 1..8 bits."""

import numpy as np
import pytest
import torch

from channelwise.errors import ChannelwiseError, PackingError
from channelwise.quant.packing import (
    pack_codes,
    packed_size,
    to_signed,
    to_unsigned,
    unpack_codes,
)

BITS = range(1, 9)
SHAPES = [(1,), (8,), (13,), (3, 1), (4, 37), (2, 3, 64), (5, 17)]


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain loop: each row's codes appended LSB first to one bit stream, cut into bytes."""
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    out = []
    for row in rows:
        stream = [(code >> k) & 1 for code in row for k in range(bits)]
        stream += [0] * (-len(stream) % 8)
        out.append([sum(stream[j + i] << i for i in range(8)) for j in range(0, len(stream), 8)])
    n_bytes = (codes.shape[-1] * bits + 7) // 8
    return torch.tensor(out, dtype=torch.uint8).reshape(*codes.shape[:-1], n_bytes)


def random_codes(shape, bits, seed=0, dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=gen).to(dtype)


def extreme_codes(shape, bits):
    top = 2**bits - 1
    alternating = torch.arange(shape[-1]).remainder(2).mul(top).expand(shape)
    return {
        "zeros": torch.zeros(shape, dtype=torch.int64),
        "all_max": torch.full(shape, top, dtype=torch.int64),
        "alternating": alternating.contiguous(),
        "alternating_flipped": (top - alternating).contiguous(),
    }


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (4, [1, 2, 3], [0x21, 0x03]),  # code 2k low nibble, 2k+1 high nibble
        (4, [0xF, 0x0, 0xA, 0x5], [0x0F, 0x5A]),
        (2, [1, 2, 3, 0, 3], [0b00_11_10_01, 0b11]),  # code 4k+i at bits 2i..2i+1
        (3, [5, 3, 7], [0b11_011_101, 0b1]),  # 5 | 3 << 3 | 7 << 6 = 477 = 0x1DD
        (3, [7] * 8, [0xFF, 0xFF, 0xFF]),  # 8 codes fill exactly 3 bytes
        (3, [0, 0, 6], [0b10_000_000, 0b1]),  # code 2 = 0b110 straddles bytes 0 and 1
        (8, [0, 255, 17], [0, 255, 17]),
    ],
)
def test_hand_computed_bytes(bits, codes, expected):
    codes = torch.tensor(codes)
    expected = torch.tensor(expected, dtype=torch.uint8)
    assert torch.equal(reference_pack(codes, bits), expected)  # the reference agrees by hand
    assert torch.equal(pack_codes(codes, bits), expected)
    assert torch.equal(unpack_codes(expected, bits, len(codes)), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_plain_reference_and_round_trips(bits, shape):
    codes = random_codes(shape, bits, seed=bits * 100 + len(shape))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_size(shape[-1], bits))
    assert torch.equal(packed, reference_pack(codes, bits))
    unpacked = unpack_codes(packed, bits, shape[-1])
    assert unpacked.dtype == torch.uint8 and unpacked.shape == codes.shape
    assert torch.equal(unpacked.long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_round_trip(bits):
    for name, codes in extreme_codes((3, 29), bits).items():
        packed = pack_codes(codes, bits)
        assert torch.equal(packed, reference_pack(codes, bits)), name
        assert torch.equal(unpack_codes(packed, bits, 29).long(), codes), name


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16])
def test_any_integer_dtype_packs_alike(dtype):
    codes = random_codes((4, 21), 7, seed=3)
    assert torch.equal(pack_codes(codes.to(dtype), 7), pack_codes(codes, 7))


def test_non_contiguous_codes_pack_like_their_copy():
    codes = random_codes((24, 10), 5, seed=4).t()
    assert not codes.is_contiguous()
    assert torch.equal(pack_codes(codes, 5), reference_pack(codes.contiguous(), 5))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63])
def test_packed_size_is_ceil_and_padding_bits_are_zero(bits, n):
    assert packed_size(n, bits) == -(-n * bits // 8)
    codes = torch.full((2, n), 2**bits - 1)
    packed = pack_codes(codes, bits)
    assert packed.shape == (2, packed_size(n, bits))
    used = n * bits % 8
    if used:
        assert torch.all(packed[:, -1] >> used == 0)
        assert torch.all(packed[:, -1] == (1 << used) - 1)


@pytest.mark.parametrize("bits", [1, 3, 4, 6])
def test_unpack_ignores_padding_bits(bits):
    n = 5  # 5·b is not a multiple of 8 for these widths
    codes = random_codes((3, n), bits, seed=5)
    packed = pack_codes(codes, bits)
    dirty = packed.clone()
    dirty[:, -1] |= 0xFF << (n * bits % 8) & 0xFF
    assert not torch.equal(dirty, packed)
    assert torch.equal(unpack_codes(dirty, bits, n).long(), codes)


def test_empty_rows_and_batches():
    for bits in (3, 4, 8):
        for shape in [(0,), (3, 0), (0, 5), (2, 0, 7)]:
            packed = pack_codes(torch.zeros(shape, dtype=torch.int32), bits)
            assert packed.shape == (*shape[:-1], packed_size(shape[-1], bits))
            assert unpack_codes(packed, bits, shape[-1]).shape == shape


@pytest.mark.parametrize("bits", BITS)
def test_signed_unsigned_round_trip(bits):
    half = 2 ** (bits - 1)
    signed = torch.arange(-half, half, dtype=torch.int8 if bits < 8 else torch.int16)
    unsigned = to_unsigned(signed, bits)
    assert unsigned.dtype == torch.uint8
    assert torch.equal(unsigned.long(), signed.long() + half)
    back = to_signed(unsigned, bits)
    assert back.dtype == torch.int8 and torch.equal(back.long(), signed.long())
    assert torch.equal(
        to_signed(unpack_codes(pack_codes(unsigned, bits), bits, 2**bits), bits), back
    )


@pytest.mark.parametrize("bits", [0, 9, -1, 4.0, True, "4"])
def test_bits_outside_1_to_8_are_refused(bits):
    with pytest.raises(PackingError, match="bits must be an integer in 1..8"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(PackingError, match="bits must be an integer in 1..8"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), bits, 4)
    with pytest.raises(PackingError, match="bits must be an integer in 1..8"):
        packed_size(4, bits)


@pytest.mark.parametrize(
    ("values", "bits", "message"),
    [
        ([0, 3, 16], 4, "must lie in \\[0, 15\\] for 4 bits, got min 0 and max 16"),
        ([-1, 3, 2], 4, "got min -1 and max 3"),
        ([0, 1, 2], 1, "must lie in \\[0, 1\\] for 1 bits, got min 0 and max 2"),
        ([-7, 300], 8, "got min -7 and max 300"),
    ],
)
def test_codes_out_of_range_name_their_min_and_max(values, bits, message):
    with pytest.raises(PackingError, match=message):
        pack_codes(torch.tensor(values), bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.bool])
def test_non_integer_codes_are_refused(dtype):
    with pytest.raises(PackingError, match=f"integer dtype, got {dtype}"):
        pack_codes(torch.zeros(8, dtype=dtype), 4)


def test_scalar_and_non_tensor_codes_are_refused():
    with pytest.raises(PackingError, match="at least one dimension"):
        pack_codes(torch.tensor(3), 4)
    with pytest.raises(PackingError, match="must be a torch.Tensor, got list"):
        pack_codes([1, 2, 3], 4)


@pytest.mark.parametrize(("bits", "n", "width"), [(4, 9, 4), (4, 9, 6), (3, 8, 4), (8, 5, 4)])
def test_unpack_with_mismatched_width_is_refused(bits, n, width):
    expected = packed_size(n, bits)
    with pytest.raises(
        PackingError, match=f"last dimension must be ceil\\({n}·{bits}/8\\) = {expected}"
    ):
        unpack_codes(torch.zeros(2, width, dtype=torch.uint8), bits, n)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_unpack_of_non_uint8_is_refused(dtype):
    with pytest.raises(PackingError, match=f"must be torch.uint8, got {dtype}"):
        unpack_codes(torch.zeros(2, 4, dtype=dtype), 4, 8)


def test_signed_helpers_check_their_ranges():
    with pytest.raises(PackingError, match="signed codes must lie in \\[-8, 7\\].*max 8"):
        to_unsigned(torch.tensor([-8, 8]), 4)
    with pytest.raises(PackingError, match="unsigned codes must lie in \\[0, 15\\].*min -1"):
        to_signed(torch.tensor([-1, 3]), 4)
    assert issubclass(PackingError, ChannelwiseError)


def test_gguf_q4_0_and_q8_0_differ_as_documented():
    """The module docstring's recipe turns our codes into bytes that gguf decodes correctly."""
    gguf = pytest.importorskip("gguf")
    signed = torch.randint(-8, 8, (3, 32), generator=torch.Generator().manual_seed(6))
    codes = unpack_codes(pack_codes(to_unsigned(signed, 4), 4), 4, 32)
    scale_one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8).expand(3, 2)
    qs = codes[:, :16] | codes[:, 16:] << 4  # first half low nibbles, second half high
    assert not torch.equal(qs, pack_codes(codes, 4))
    block = torch.cat([scale_one, qs], dim=1).numpy()
    decoded = gguf.quants.dequantize(block, gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(decoded, signed.float().numpy())

    signed8 = torch.randint(-128, 128, (3, 32), generator=torch.Generator().manual_seed(7))
    q8 = pack_codes(to_unsigned(signed8, 8), 8) ^ 0x80
    block8 = torch.cat([scale_one, q8], dim=1).numpy()
    decoded8 = gguf.quants.dequantize(block8, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(decoded8, signed8.float().numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_on_cuda_matches_cpu(bits):
    codes = random_codes((6, 77), bits, seed=bits)
    packed = pack_codes(codes.cuda(), bits)
    assert packed.is_cuda and torch.equal(packed.cpu(), pack_codes(codes, bits))
    unpacked = unpack_codes(packed, bits, 77)
    assert unpacked.is_cuda and torch.equal(unpacked.cpu().long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_results_are_contiguous(bits):
    codes = random_codes((3, 11), bits, seed=8)
    packed = pack_codes(codes, bits)
    assert packed.is_contiguous() and unpack_codes(packed, bits, 11).is_contiguous()
