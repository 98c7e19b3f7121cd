"""Codec tests: round trips against independent references, layout, specials, corruption.

The references below are written from the module docstrings' specifications
(per-block scalar loops, bit formulas), not from the vectorised code, so a
chunking, reshaping, packing or rounding bug shows up as a byte mismatch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lz4.block
import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collnet.codec import (
    CODEC_NAMES,
    Codec,
    Lz4Codec,
    RawCodec,
    Uint4Codec,
    Uint8Codec,
    get_codec,
)
from collnet.errors import CodecError, InvalidArgument, NonFiniteError

# A codec must not leak numpy RuntimeWarnings (overflow, invalid cast) to callers.
pytestmark = pytest.mark.filterwarnings("error")

F32 = npt.NDArray[np.float32]
ALL_NAMES = [*CODEC_NAMES, *(f"{name}+lz4" for name in CODEC_NAMES)]
BLOCK_SIZES = [1, 2, 3, 7, 64, 256, 1000]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- inputs ----------------------------------------------------------------------------


def det_input(n: int) -> F32:
    """A fixed pseudo-random float32 vector built from IEEE-exact integer and float ops.

    No numpy RNG: its streams may change between numpy versions, and these
    values feed hard-coded digests.
    """
    i = np.arange(1, n + 1, dtype=np.uint64)
    h = i * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    mantissa = (h >> np.uint64(40)).astype(np.int64) - (1 << 23)  # 24-bit signed
    exponent = ((h >> np.uint64(8)) & np.uint64(7)).astype(np.int64) - 4
    x = mantissa.astype(np.float32) / np.float32(3 * 2**20)
    return x * np.ldexp(np.float32(1), exponent).astype(np.float32)


def finite_arrays(max_len: int = 2500, bound: float = 1e30) -> st.SearchStrategy[F32]:
    limit = float(np.float32(bound))  # hypothesis wants bounds exact in float32
    return st.integers(0, max_len).flatmap(
        lambda n: hnp.arrays(
            np.float32,
            n,
            elements=st.floats(-limit, limit, width=32, allow_subnormal=True),
        )
    )


# -- references ------------------------------------------------------------------------


def ref_bf16_bits(x: F32) -> npt.NDArray[np.uint16]:
    """Round-to-nearest-even float32 -> bfloat16 on the bits (finite/Inf inputs)."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def ref_minmax_encode(x: F32, bits: int, block_size: int) -> bytes:
    """The layout and formulas of collnet/codec/minmax.py, one block at a time."""
    levels = np.float32(2**bits - 1)
    scales: list[np.float32] = []
    lows: list[np.float32] = []
    codes: list[int] = []
    for start in range(0, x.shape[0], block_size):
        block = x[start : start + block_size]
        # + 0: a zero min or max is stored as +0.0 whatever the sign of the zeros.
        lo, hi = np.float32(block.min()) + np.float32(0), np.float32(block.max()) + np.float32(0)
        scale = np.float32((hi - lo) / levels)
        divisor = scale if scale != 0 else np.float32(1)
        q = np.minimum(np.rint((block - lo) / divisor), levels)
        scales.append(scale)
        lows.append(lo)
        codes.extend(int(c) for c in q)
    header = np.array(scales, "<f4").tobytes() + np.array(lows, "<f4").tobytes()
    if bits == 8:
        return header + bytes(codes)
    if len(codes) % 2:
        codes.append(0)
    return header + bytes(codes[k] | codes[k + 1] << 4 for k in range(0, len(codes), 2))


def ref_minmax_decode(data: bytes, n: int, bits: int, block_size: int) -> F32:
    nb = -(-n // block_size)
    scales = np.frombuffer(data, "<f4", nb, 0)
    lows = np.frombuffer(data, "<f4", nb, 4 * nb)
    body = np.frombuffer(data, np.uint8, offset=8 * nb)
    nibbles = np.stack([body & 15, body >> 4], axis=1).reshape(-1)
    codes = body[:n] if bits == 8 else nibbles[:n]
    out = np.empty(n, np.float32)
    for b in range(nb):
        sl = slice(b * block_size, min(n, (b + 1) * block_size))
        out[sl] = codes[sl].astype(np.float32) * scales[b] + lows[b]
    return out


def minmax_bound(x: F32, bits: int, block_size: int) -> npt.NDArray[np.float64]:
    """Per-element error allowance: scale/2 plus float32 rounding slack."""
    bound = np.empty(x.shape[0], np.float64)
    for start in range(0, x.shape[0], block_size):
        block = x[start : start + block_size]
        lo, hi = np.float32(block.min()), np.float32(block.max())
        scale = float(np.float32((hi - lo) / np.float32(2**bits - 1)))
        slack = max(abs(float(lo)), abs(float(hi))) * 2**-20 + 2**-117
        bound[start : start + block_size] = scale / 2 + slack
    return bound


def codec_for(name: str, block_size: int = 256) -> Codec:
    return get_codec(name, block_size=block_size)


def bits_of(name: str) -> int:
    return 8 if name.startswith("uint8") else 4


# -- registry --------------------------------------------------------------------------


def test_get_codec_returns_named_shared_instances() -> None:
    for name in CODEC_NAMES:
        codec = get_codec(name)
        assert codec.name == name
        assert codec is get_codec(name)
        wrapped = get_codec(name + "+lz4")
        assert isinstance(wrapped, Lz4Codec)
        assert wrapped.name == name + "+lz4"
        assert wrapped is get_codec(name, lz4=True)
        assert wrapped.lossy == codec.lossy
    assert get_codec("none").lossy is False
    assert all(get_codec(name).lossy for name in CODEC_NAMES[1:])


def test_get_codec_block_size_selects_instance() -> None:
    small = get_codec("uint8", block_size=64)
    assert isinstance(small, Uint8Codec) and small.block_size == 64
    assert small is not get_codec("uint8")
    default = get_codec("uint8")
    assert isinstance(default, Uint8Codec) and default.block_size == 256
    assert isinstance(get_codec("uint4", block_size=3), Uint4Codec)
    # Codecs without blocks ignore the block size and stay shared.
    assert get_codec("fp16", block_size=64) is get_codec("fp16")


@pytest.mark.parametrize("bad", ["", "int8", "UINT8", "uint8+lz4+lz4", "lz4", "fp32", "none+"])
def test_get_codec_unknown_name_lists_valid_names(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        get_codec(bad)
    for name in CODEC_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "256"])
def test_get_codec_rejects_bad_block_size(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        get_codec("uint8", block_size=bad)  # type: ignore[arg-type]


def test_lz4_requires_fixed_size_inner() -> None:
    with pytest.raises(InvalidArgument):
        Lz4Codec(get_codec("uint8+lz4"))


# -- round trips -----------------------------------------------------------------------


@FAST
@given(x=finite_arrays(bound=3.4e38))
def test_none_round_trips_every_finite_bit_pattern(x: F32) -> None:
    codec = get_codec("none")
    data = codec.encode(x)
    assert data.dtype == np.uint8 and data.tobytes() == x.astype("<f4").tobytes()
    assert np.array_equal(codec.decode(data, x.shape[0]).view(np.uint32), x.view(np.uint32))


def test_none_round_trips_specials_bit_exactly() -> None:
    bits = np.array(
        [0x7FC00001, 0xFFC12345, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000, 0, 1],
        np.uint32,
    )
    codec = get_codec("none")
    out = codec.decode(codec.encode(bits.view(np.float32)), bits.shape[0])
    assert np.array_equal(out.view(np.uint32), bits)


@FAST
@given(x=finite_arrays(bound=65504.0))
def test_fp16_equals_numpy_cast_and_meets_bound(x: F32) -> None:
    codec = get_codec("fp16")
    data = codec.encode(x)
    assert data.tobytes() == x.astype("<f2").tobytes()
    y = codec.decode(data, x.shape[0])
    assert np.array_equal(y, x.astype(np.float16).astype(np.float32))
    err = np.abs(y.astype(np.float64) - x)
    assert np.all(err <= np.abs(x) * 2.0**-11 + 2.0**-25)
    if x.size:
        assert err.max() <= codec.max_abs_error_bound(x)


@FAST
@given(x=finite_arrays(bound=3.3e38))
def test_bf16_equals_rne_reference_and_ml_dtypes(x: F32) -> None:
    codec = get_codec("bf16")
    data = codec.encode(x)
    assert np.array_equal(data.view("<u2"), ref_bf16_bits(x))
    assert data.tobytes() == x.astype(ml_dtypes.bfloat16).tobytes()
    y = codec.decode(data, x.shape[0])
    assert np.array_equal(y, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    err = np.abs(y.astype(np.float64) - x)
    assert np.all(err <= np.abs(x) * 2.0**-8 + 2.0**-134)
    if x.size:
        assert err.max() <= codec.max_abs_error_bound(x)


def test_half_precision_rounds_ties_to_even() -> None:
    one = 1.0
    fp16 = get_codec("fp16")
    x = np.array([one + 2**-11, one + 3 * 2**-11, -(one + 2**-11), 2.0**-25, 3 * 2.0**-25])
    y = fp16.decode(fp16.encode(x.astype(np.float32)), 5)
    assert y.tolist() == [one, one + 2**-9, -one, 0.0, 2.0**-23]

    bf16 = get_codec("bf16")
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x00008000, 0x00018000], np.uint32)
    y = bf16.decode(bf16.encode(bits.view(np.float32)), 5)
    assert y.view(np.uint32).tolist() == [
        0x3F800000,
        0x3F820000,
        0x3F810000,
        0x00000000,
        0x00020000,
    ]


@pytest.mark.parametrize("name", ["uint8", "uint4"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@FAST
@given(x=finite_arrays(bound=1e37))
def test_minmax_matches_reference_and_error_bound(name: str, block_size: int, x: F32) -> None:
    codec = codec_for(name, block_size)
    bits = bits_of(name)
    n = x.shape[0]
    data = codec.encode(x)
    assert data.tobytes() == ref_minmax_encode(x, bits, block_size)
    assert len(data) == codec.encoded_nbytes(n)
    y = codec.decode(data, n)
    assert y.dtype == np.float32 and y.shape == (n,)
    assert np.array_equal(y, ref_minmax_decode(data.tobytes(), n, bits, block_size))
    assert np.all(np.isfinite(y))
    err = np.abs(y.astype(np.float64) - x)
    assert np.all(err <= minmax_bound(x, bits, block_size))
    if n:
        assert err.max() <= codec.max_abs_error_bound(x)


@pytest.mark.parametrize("name", ["uint8", "uint4"])
@pytest.mark.parametrize("n", [0, 1, 2, 17, 255, 256, 257, 511, 4099, 70001, 140_000])
def test_minmax_lengths_across_chunk_and_block_edges(name: str, n: int) -> None:
    # Lengths around block and 64 Ki-value chunk boundaries, on smooth data
    # where a misplaced block header would be far outside the bound.
    x = det_input(n) + np.linspace(-50, 50, n, dtype=np.float32)
    codec = get_codec(name)
    bits = bits_of(name)
    data = codec.encode(x)
    assert data.tobytes() == ref_minmax_encode(x, bits, 256)
    err = np.abs(codec.decode(data, n).astype(np.float64) - x)
    assert np.all(err <= minmax_bound(x, bits, 256))


def test_minmax_bound_is_tight_enough_to_catch_off_by_one_codes() -> None:
    x = np.linspace(-1, 1, 4096, dtype=np.float32)
    blocks = x.reshape(-1, 256).astype(np.float64)
    for name, levels in [("uint8", 255), ("uint4", 15)]:
        half_step = float((blocks.max(axis=1) - blocks.min(axis=1)).max()) / levels / 2
        bound = get_codec(name).max_abs_error_bound(x)
        assert half_step * 0.999 <= bound <= half_step * 1.01


@pytest.mark.parametrize("name", ALL_NAMES)
@settings(max_examples=25, deadline=None)
@given(x=finite_arrays(max_len=1200, bound=60000.0), block_size=st.sampled_from(BLOCK_SIZES))
def test_decode_add_equals_acc_plus_decode(name: str, x: F32, block_size: int) -> None:
    codec = codec_for(name, block_size)
    data = codec.encode(x)
    n = x.shape[0]
    acc = det_input(n)
    expected = acc + codec.decode(data, n)
    codec.decode_add(data, acc, np.empty(n, np.float32))
    assert np.array_equal(acc, expected)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_decode_writes_into_out_and_accepts_any_buffer(name: str) -> None:
    codec = codec_for(name, 7)
    x = det_input(1001)
    data = codec.encode(x)
    expected = codec.decode(data, 1001)
    out = np.full(1001, np.nan, np.float32)
    assert codec.decode(data, 1001, out=out) is out
    assert np.array_equal(out, expected)
    # bytes, memoryview, and a memoryview at an odd (unaligned) offset.
    padded = b"\x00" + data.tobytes()
    for buf in (data.tobytes(), memoryview(data.data), memoryview(padded)[1:]):
        assert np.array_equal(codec.decode(buf, 1001), expected)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_bad_arguments_raise_invalid_argument(name: str) -> None:
    codec = get_codec(name)
    x = det_input(64)
    for bad in (x.astype(np.float64), x.reshape(8, 8), x[::2], x.astype(">f4"), [1.0]):
        with pytest.raises(InvalidArgument):
            codec.encode(bad)  # type: ignore[arg-type]
    data = codec.encode(x)
    bad_outs: list[Any] = [
        np.empty(63, np.float32),
        np.empty(64, np.float64),
        np.empty(128, np.float32)[::2],
    ]
    for out in bad_outs:
        with pytest.raises(InvalidArgument):
            codec.decode(data, 64, out=out)
    with pytest.raises(InvalidArgument):
        codec.decode(data, -1)
    with pytest.raises(InvalidArgument):
        codec.decode(data.astype(np.int8), 64)


# -- sizes and layout ------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 257, 1000])
def test_encoded_sizes(name: str, n: int) -> None:
    codec = codec_for(name, 100)
    data = codec.encode(det_input(n))
    size = codec.encoded_nbytes(n)
    if isinstance(codec, Lz4Codec):
        assert size is None
    else:
        assert size == len(data)
    assert len(data) <= codec.max_encoded_nbytes(n)


def test_fixed_sizes_follow_documented_layout() -> None:
    assert get_codec("none").encoded_nbytes(10) == 40
    assert get_codec("fp16").encoded_nbytes(10) == 20
    assert get_codec("bf16").encoded_nbytes(10) == 20
    assert get_codec("uint8", block_size=4).encoded_nbytes(10) == 3 * 8 + 10
    assert get_codec("uint4", block_size=4).encoded_nbytes(10) == 3 * 8 + 5
    assert get_codec("uint4", block_size=4).encoded_nbytes(9) == 3 * 8 + 5
    assert get_codec("uint8").encoded_nbytes(0) == 0


def test_uint4_layout_by_hand() -> None:
    # Block [0, 15, 1, 14]: min 0, scale 1, codes equal the values.
    # Block [2]: constant, scale 0, min 2, code 0; odd n pads a zero nibble.
    x = np.array([0, 15, 1, 14, 2], np.float32)
    data = get_codec("uint4", block_size=4).encode(x)
    header = np.array([1.0, 0.0, 0.0, 2.0], "<f4").tobytes()
    assert data.tobytes() == header + bytes([0xF0, 0xE1, 0x00])


def test_uint8_layout_by_hand() -> None:
    x = np.array([-1.0, 1.0, 0.0, 5.0, 5.0], np.float32)
    data = get_codec("uint8", block_size=3).encode(x)
    scale = np.float32(2) / np.float32(255)
    mid = int(np.rint(np.float32(1) / scale))  # (0 - -1) / scale, about 127.5
    header = np.array([scale, 0.0, -1.0, 5.0], "<f4").tobytes()
    assert data.tobytes() == header + bytes([0, 255, mid, 0, 0])


# -- determinism -----------------------------------------------------------------------

# sha256 of encode(det_input(10007)) and of its decoding. A change here means
# peers running different builds would no longer agree bit for bit.
DIGESTS = {
    ("bf16", 256): (
        "21583cb22505904302008fc1eccdd322b7285c3e349052498707f426142370f1",
        "29b1be3d3ae10d53c236047bd17387962ec4421c08d303a9edd58246c3dba491",
    ),
    ("fp16", 256): (
        "b65da0c43619426f7466e200c57cbd16b7361b5bcda088d5c04a7e9b190ecb2a",
        "2bad8ca0ed8f443a6f9eed5545a217b45d6553de7699df8fdf402eb45a8c4f1c",
    ),
    ("none", 256): (
        "f1f61341a47bcb16f2789a4ea4dc2321646483d92fe63fe485815516bfb219fd",
        "f1f61341a47bcb16f2789a4ea4dc2321646483d92fe63fe485815516bfb219fd",
    ),
    ("uint4", 7): (
        "6296961a63c2042e34df41cdc7801a80efb54cff50d7a34f45540406d8e91d63",
        "c813c694f836826467ffa9a066b47f4e5bf5ac17f5c508e83bf9dd0948954fcf",
    ),
    ("uint4", 256): (
        "ff7cf6a6e1bdc3e2d7c424a51fc594c65eb6a196e003f63e2bddcd71b15239fb",
        "6fb4e08fd0cb3f68eb294b3fc3ba5cf50da3774267c5f9a26dfa7e43acaadc26",
    ),
    ("uint8", 7): (
        "1d83564ecc4ded66c96e8bdb057be06fd38e8d887cada00576e0fb6b56a9df68",
        "c8127acf70233df9a03f5dd7c3d87bbaf5433042ed7f3dbde44b6e02de360cb8",
    ),
    ("uint8", 256): (
        "1c89a4be88021311a39d3c4d161e683aa446449cf7ba4ee327e76420886d4d2e",
        "9f662184b7d57fc9d4d9b43182751cc85cde51c25576d03788880bc4974c0bfc",
    ),
}


@pytest.mark.parametrize(("name", "block_size"), sorted(DIGESTS))
def test_encoding_is_deterministic_and_pinned(name: str, block_size: int) -> None:
    codec = codec_for(name, block_size)
    x = det_input(10007)
    data = codec.encode(x)
    assert np.array_equal(data, codec.encode(x.copy()))
    # The pinned bytes are the specified encoding, not just whatever the code emitted.
    reference = {
        "none": lambda: x.astype("<f4").tobytes(),
        "fp16": lambda: x.astype("<f2").tobytes(),
        "bf16": lambda: ref_bf16_bits(x).astype("<u2").tobytes(),
        "uint8": lambda: ref_minmax_encode(x, 8, block_size),
        "uint4": lambda: ref_minmax_encode(x, 4, block_size),
    }[name]()
    assert data.tobytes() == reference
    decoded = codec.decode(data, x.shape[0])
    got = (
        hashlib.sha256(data.tobytes()).hexdigest(),
        hashlib.sha256(decoded.tobytes()).hexdigest(),
    )
    assert got == DIGESTS[(name, block_size)]


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_lz4_decodes_to_the_inner_codec_result(name: str) -> None:
    inner = get_codec(name)
    for x in (det_input(10007), np.tile(det_input(64), 300)):
        data = get_codec(name, lz4=True).encode(x)
        assert np.array_equal(
            get_codec(name, lz4=True).decode(data, x.shape[0]).view(np.uint32),
            inner.decode(inner.encode(x), x.shape[0]).view(np.uint32),
        )


def test_lz4_compresses_repetitive_and_stores_incompressible() -> None:
    codec = get_codec("uint8+lz4")
    inner_size = get_codec("uint8").encoded_nbytes(256 * 64)
    assert inner_size is not None
    repetitive = np.tile(np.arange(256, dtype=np.float32), 64)
    data = codec.encode(repetitive)
    assert data[0] == 1 and len(data) < inner_size // 4
    noisy = codec.encode(det_input(256 * 64))
    assert noisy[0] == 0 and len(noisy) == inner_size + 1
    empty = codec.encode(np.empty(0, np.float32))
    assert codec.decode(empty, 0).shape == (0,)


# -- specials --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_precision_passes_nan_and_inf_through(name: str) -> None:
    codec = get_codec(name)
    x = np.array([1.5, np.nan, np.inf, -np.inf, -np.nan, -0.0, 2.0], np.float32)
    y = codec.decode(codec.encode(x), x.shape[0])
    assert np.array_equal(np.isnan(y), np.isnan(x))
    assert np.array_equal(np.signbit(y), np.signbit(x))
    finite = ~np.isnan(x)
    assert np.array_equal(y[finite], x[finite])


@pytest.mark.parametrize(
    ("name", "ok", "overflow"),
    [
        ("fp16", [65504.0, 65519.996, -65519.996], [65520.0, -65520.0, 1e30, 3.4e38]),
        ("bf16", [3.3895e38, -3.3895e38, 3.39e38], [3.3962e38, -3.4e38, 3.4028235e38]),
    ],
)
def test_half_precision_overflow_raises_instead_of_inf(
    name: str, ok: list[float], overflow: list[float]
) -> None:
    codec = get_codec(name)
    fine = np.array(ok, np.float32)
    y = codec.decode(codec.encode(fine), fine.shape[0])
    assert np.all(np.isfinite(y))
    for value in overflow:
        for pos in (0, 5, 9):
            x = np.zeros(10, np.float32)
            x[pos] = value
            with pytest.raises(NonFiniteError):
                codec.encode(x)
            # A NaN elsewhere must not hide the overflow from the min/max test.
            x[(pos + 1) % 10] = np.nan
            with pytest.raises(NonFiniteError):
                codec.encode(x)


@pytest.mark.parametrize("name", ["uint8", "uint4", "uint8+lz4"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("pos", [0, 100, 255, 256, 999])
def test_minmax_rejects_non_finite(name: str, value: float, pos: int) -> None:
    x = det_input(1000)
    x[pos] = value
    with pytest.raises(NonFiniteError) as info:
        get_codec(name).encode(x)
    assert info.value.fields["index"] == pos


@pytest.mark.parametrize("name", ["uint8", "uint4"])
def test_minmax_rejects_range_overflow(name: str) -> None:
    x = np.array([-3e38, 3e38, 0.0], np.float32)
    with pytest.raises(NonFiniteError):
        get_codec(name).encode(x)
    # Near float32's max the top decoded value could round to Inf.
    y = np.array([3.0e38, np.finfo(np.float32).max], np.float32)
    codec = get_codec(name)
    try:
        data = codec.encode(y)
    except NonFiniteError:
        return
    assert np.all(np.isfinite(codec.decode(data, 2)))


@pytest.mark.parametrize("name", ["uint8", "uint4"])
@pytest.mark.parametrize("value", [0.0, -7.25, 0.1, 1e-40, -3.4e38, 3.4028235e38])
def test_minmax_constant_blocks_are_exact(name: str, value: float) -> None:
    codec = get_codec(name, block_size=16)
    x = np.full(40, value, np.float32)
    x[16:32] = det_input(16)  # one ordinary block between constant ones
    data = codec.encode(x)
    scales = data[: 4 * 3].view("<f4")
    assert scales[0] == 0 and scales[2] == 0 and scales[1] > 0
    y = codec.decode(data, 40)
    assert np.array_equal(y[:16], x[:16]) and np.array_equal(y[32:], x[32:])


@pytest.mark.parametrize("name", ["uint8", "uint4"])
def test_minmax_subnormal_ranges_stay_within_bound(name: str) -> None:
    tiny = np.float32(2.0**-149)
    bits = bits_of(name)
    for span in (1, 3, 254, 255, 300, 3000, 2**20):
        x = (np.arange(0, span + 1, max(1, span // 50)) * tiny).astype(np.float32)
        x = np.concatenate([x, np.float32(-1e-39) + x]).astype(np.float32)
        codec = get_codec(name, block_size=x.shape[0] // 2)
        data = codec.encode(x)
        assert data.tobytes() == ref_minmax_encode(x, bits, x.shape[0] // 2)
        err = np.abs(codec.decode(data, x.shape[0]).astype(np.float64) - x)
        assert np.all(err <= minmax_bound(x, bits, x.shape[0] // 2))


def test_none_accepts_non_finite() -> None:
    x = np.array([np.nan, np.inf, -np.inf, 3e38], np.float32)
    codec = get_codec("none")
    assert np.array_equal(codec.decode(codec.encode(x), 4), x, equal_nan=True)


# -- corrupt and truncated input -------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_fixed_size_codecs_reject_wrong_length(name: str, n: int) -> None:
    codec = codec_for(name, 7)
    data = codec.encode(det_input(n)).tobytes()
    for bad in (data + b"\x00", data[:-1] if data else b"\x01", data * 2 if data else b"\x00"):
        with pytest.raises(CodecError):
            codec.decode(bad, n)
    # uint4 with odd n has room for one more code: same size, so not detectable.
    if codec.encoded_nbytes(n + 1) != len(data):
        with pytest.raises(CodecError):
            codec.decode(data, n + 1)


@pytest.mark.parametrize("name", ["uint8", "uint4"])
def test_minmax_rejects_corrupt_header(name: str) -> None:
    codec = get_codec(name, block_size=10)
    data = codec.encode(det_input(35))  # 4 blocks: scales at 0..16, mins at 16..32
    for offset, value in [(0, np.nan), (4, -1.0), (12, np.inf), (16, np.nan), (28, -np.inf)]:
        bad = data.copy()
        bad[offset : offset + 4] = np.array([value], "<f4").view(np.uint8)
        with pytest.raises(CodecError):
            codec.decode(bad, 35)
    huge = data.copy()
    huge[0:4] = np.array([3e38], "<f4").view(np.uint8)  # 255 * 3e38 overflows
    with pytest.raises(CodecError):
        codec.decode(huge, 35)


def test_uint4_rejects_nonzero_padding_nibble() -> None:
    codec = get_codec("uint4")
    data = codec.encode(det_input(5))
    assert data[-1] >> 4 == 0
    data[-1] |= 0x10
    with pytest.raises(CodecError):
        codec.decode(data, 5)


def test_lz4_rejects_malformed_input() -> None:
    codec = get_codec("uint8+lz4")
    x = np.tile(np.arange(256, dtype=np.float32), 8)
    data = codec.encode(x)
    assert data[0] == 1
    with pytest.raises(CodecError):
        codec.decode(b"", 2048)
    with pytest.raises(CodecError):
        codec.decode(bytes([7]) + data[1:].tobytes(), 2048)
    for cut in (1, 2, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError):
            codec.decode(data[:cut], 2048)
    # A valid block for a different n: decompressed size disagrees with n.
    for n in (2047, 2049, 4096, 0):
        with pytest.raises(CodecError):
            codec.decode(data, n)
    # A block claiming far more output than n allows is cut off at n's size.
    bomb = lz4.block.compress(bytes(1 << 20), store_size=False)
    with pytest.raises(CodecError):
        codec.decode(b"\x01" + bomb, 10)
    stored = codec.encode(det_input(100))
    assert stored[0] == 0
    with pytest.raises(CodecError):
        codec.decode(stored[:-1], 100)


@pytest.mark.parametrize("name", ALL_NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300), n=st.integers(0, 120))
def test_random_bytes_decode_or_raise_codec_error(name: str, data: bytes, n: int) -> None:
    codec = codec_for(name, 16)
    try:
        out = codec.decode(data, n)
    except CodecError:
        return
    assert out.shape == (n,) and out.dtype == np.float32
    if isinstance(codec.inner if isinstance(codec, Lz4Codec) else codec, Uint8Codec | Uint4Codec):
        assert np.all(np.isfinite(out))


def test_raw_codec_class_is_none() -> None:
    assert isinstance(get_codec("none"), RawCodec)
