"""The C min-max kernels against the numpy path: same bytes, same floats, same errors.

``collnet.codec._minmax`` is optional (built by setup.py when a compiler is
present); these tests skip without it. Every comparison is on bits: encoded
bytes, decoded float32 bit patterns (so the sign of zero counts), and for
errors the exception type, message and fields.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collnet.codec import get_codec, minmax
from collnet.codec.minmax import MinMaxCodec, Uint4Codec, Uint8Codec
from collnet.errors import CodecError, InvalidArgument, NonFiniteError

_minmax: Any = pytest.importorskip("collnet.codec._minmax")

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

F32 = npt.NDArray[np.float32]
CLASSES = [Uint8Codec, Uint4Codec]
# The brief's sizes plus ones whose blocks straddle the C uint4 staging chunk (4096).
BLOCK_SIZES = [1, 2, 3, 7, 64, 256, 1000, 4097]
LENGTHS = [0, 1, 2, 3, 5, 7, 13, 31, 127, 251, 255, 256, 257, 1009, 4095, 4096, 4097, 8209]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = np.float32(2.0**-149)


def pair(cls: type[MinMaxCodec], block_size: int) -> tuple[MinMaxCodec, MinMaxCodec]:
    return cls(block_size, accelerated=True), cls(block_size, accelerated=False)


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` as comparable bits, or the error's type, message and fields."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # compared, not swallowed
        return (type(exc), str(exc), getattr(exc, "fields", None))
    if isinstance(result, np.ndarray):
        return ("ok", result.dtype.str, result.tobytes())
    return ("ok", result)


def same(fast: MinMaxCodec, ref: MinMaxCodec, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``method`` on both codecs; assert equal outcomes; return it."""
    got = outcome(getattr(fast, method), *args, **kwargs)
    assert got == outcome(getattr(ref, method), *args, **kwargs)
    return got


def assert_same_decodes(
    fast: MinMaxCodec, ref: MinMaxCodec, data: Any, n: int, acc0: F32 | None = None
) -> None:
    same(fast, ref, "decode", data, n)
    out_f, out_r = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    got = outcome(fast.decode, data, n, out=out_f)
    assert got == outcome(ref.decode, data, n, out=out_r)
    if got[0] == "ok":
        assert out_f.tobytes() == out_r.tobytes()
    if acc0 is None:
        acc0 = np.zeros(n, np.float32)
    acc_f, acc_r = acc0.copy(), acc0.copy()
    scratch = np.empty(n, np.float32)
    got = outcome(fast.decode_add, data, acc_f, scratch)
    assert got == outcome(ref.decode_add, data, acc_r, scratch)
    # Also on errors: neither path touches acc before validating everything.
    assert acc_f.tobytes() == acc_r.tobytes()


# -- inputs ----------------------------------------------------------------------------

KINDS = [
    "normal",
    "uniform",
    "constant_blocks",
    "huge",
    "tiny",
    "subnormal",
    "any_bits",
    "mixed_signs",
    "zeros",
    "ties",
]


def make_vector(kind: str, n: int, seed: int) -> F32:
    with np.errstate(over="ignore"):  # float64 -> float32 casts may overflow (then replaced)
        return _make_vector(kind, n, np.random.default_rng(seed))


def _make_vector(kind: str, n: int, rng: np.random.Generator) -> F32:
    if kind == "normal":
        scale = float(10.0 ** rng.uniform(-30, 30))
        return (rng.standard_normal(n) * scale).astype(np.float32)
    if kind == "uniform":
        a, b = sorted(rng.uniform(-1e6, 1e6, 2))
        return rng.uniform(a, b, n).astype(np.float32)
    if kind == "constant_blocks":
        values = np.array([0.0, -0.0, 1.0, -7.25, 1e-40, -3e38, 3.4e38, TINY, 1e-45], np.float32)
        x = np.empty(n, np.float32)
        pos = 0
        while pos < n:
            run = int(rng.integers(1, 600))
            x[pos : pos + run] = values[rng.integers(len(values))]
            pos += run
        return x
    if kind == "huge":
        # Near float32's max: some blocks overflow their range or top value.
        top = float(rng.choice([1e37, 1e38, 1.7e38, 3.4e38]))
        return (rng.uniform(-1, 1, n) * top).astype(np.float32)
    if kind == "tiny":
        return (rng.standard_normal(n) * 1e-36).astype(np.float32)
    if kind == "subnormal":
        return (rng.integers(-(2**23), 2**23, n) * TINY).astype(np.float32)
    if kind == "any_bits":
        bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        return np.where(np.isfinite(x), x, np.float32(1.5)).astype(np.float32)
    if kind == "mixed_signs":
        mag = 2.0 ** rng.integers(-149, 128, n).astype(np.float64)
        x = (rng.choice([-1.0, 1.0], n) * mag * rng.uniform(1, 2, n)).astype(np.float32)
        return np.where(np.isfinite(x), x, np.float32(-2.0)).astype(np.float32)
    if kind == "zeros":
        x = rng.choice(np.array([0.0, -0.0], np.float32), n)
        sprinkle = rng.random(n) < 0.05
        x[sprinkle] = rng.standard_normal(int(sprinkle.sum()))
        return x.astype(np.float32)
    assert kind == "ties"
    # Integers and half-integers: quotients land exactly on rounding ties.
    return (rng.integers(-600, 600, n) * np.float32(0.5)).astype(np.float32)


@st.composite
def vectors(draw: st.DrawFn) -> F32:
    n = draw(st.one_of(st.sampled_from(LENGTHS), st.integers(0, 3000)))
    if draw(st.booleans()):
        return make_vector(draw(st.sampled_from(KINDS)), n, draw(st.integers(0, 2**32 - 1)))
    # Hypothesis' own floats (it favours 0.0, -0.0, subnormals and extremes).
    return draw(
        hnp.arrays(
            np.float32,
            min(n, 600),
            elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
        )
    )


# -- the module --------------------------------------------------------------------------


def test_extension_is_used_and_passed_its_import_probe() -> None:
    assert minmax.ACCELERATOR_AVAILABLE
    assert minmax._accelerator_agrees()
    assert get_codec("uint8").accelerated is True  # type: ignore[attr-defined]
    assert get_codec("uint4", block_size=7).accelerated is True  # type: ignore[attr-defined]
    assert Uint8Codec(accelerated=False).accelerated is False
    for bad in (1, "yes", 0):
        with pytest.raises(InvalidArgument):
            Uint8Codec(accelerated=bad)  # type: ignore[arg-type]


def test_valid_calls_never_touch_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = make_vector("normal", 5000, 1)
    want = {cls: cls(7, accelerated=False).encode(x) for cls in CLASSES}

    def boom(*args: Any) -> None:
        raise AssertionError("numpy path used")

    for name in ("_quantize", "_parse", "_dequantize"):
        monkeypatch.setattr(MinMaxCodec, name, boom)
    for cls in CLASSES:
        codec = cls(7, accelerated=True)
        data = codec.encode(x)
        assert data.tobytes() == want[cls].tobytes()
        codec.decode(data, 5000)
        codec.decode(data.tobytes(), 5000, out=np.empty(5000, np.float32))
        codec.decode_add(data, np.zeros(5000, np.float32), np.empty(5000, np.float32))
        with pytest.raises(AssertionError):
            codec.encode(np.frombuffer(b"\x00" + x.tobytes(), np.float32, offset=1))


def test_extension_rejects_inconsistent_buffers() -> None:
    x = np.zeros(10, np.float32)
    out = np.empty(8 * 2 + 10, np.uint8)
    assert _minmax.encode(x, out, 10, 8, 8) == 0
    with pytest.raises(ValueError):
        _minmax.encode(x, out, 10, 8, 4)  # out is the uint8 size
    with pytest.raises(ValueError):
        _minmax.encode(x, out, 11, 8, 8)
    with pytest.raises(ValueError):
        _minmax.encode(x, out, 10, 0, 8)
    with pytest.raises(ValueError):
        _minmax.decode(out, 10, 8, 8, np.empty(9, np.float32), None)
    with pytest.raises(ValueError):
        _minmax.decode(out, 10, 8, 8, x, np.empty(11, np.float32))
    with pytest.raises(BufferError):
        _minmax.decode(out, 10, 8, 8, x, b"not writable")


# -- equality on valid input -----------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@FAST
@given(x=vectors(), acc_seed=st.integers(0, 2**32 - 1))
def test_c_and_numpy_agree_bit_for_bit(
    cls: type[MinMaxCodec], block_size: int, x: F32, acc_seed: int
) -> None:
    fast, ref = pair(cls, block_size)
    n = x.shape[0]
    got = same(fast, ref, "encode", x)
    # The kernel itself, so a silent fallback to numpy cannot pass for agreement.
    direct = np.empty(ref.encoded_nbytes(n), np.uint8)
    rc = _minmax.encode(x, direct, n, block_size, cls.bits)
    if got[0] != "ok":
        assert got[0] is NonFiniteError and rc == 1
        return
    assert rc == 0 and direct.tobytes() == got[2]
    data = np.frombuffer(got[2], np.uint8)
    out = np.empty(n, np.float32)
    assert _minmax.decode(data, n, block_size, cls.bits, out, None) == 0
    assert out.tobytes() == ref.decode(data, n).tobytes()
    rng = np.random.default_rng(acc_seed)
    acc0 = rng.choice(np.array([0.0, -0.0, 1.0, -3e38, 3e38], np.float32), n)
    assert_same_decodes(fast, ref, data, n, acc0.astype(np.float32))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("n", LENGTHS)
def test_lengths_and_default_block(cls: type[MinMaxCodec], n: int) -> None:
    for kind in KINDS:
        x = make_vector(kind, n, n)
        fast, ref = pair(cls, 256)
        got = same(fast, ref, "encode", x)
        if got[0] == "ok":
            assert_same_decodes(fast, ref, np.frombuffer(got[2], np.uint8), n)


def test_signed_zero_extremes_are_canonical() -> None:
    # Whatever order a reduction visits 0.0 and -0.0 in, the stored min is +0.
    for cls in CLASSES:
        for x in ([-0.0, 0.0, 1.0], [0.0, -0.0, 1.0], [-0.0] * 5, [1.0, -0.0, 0.0, -0.0]):
            arr = np.array(x, np.float32)
            for codec in pair(cls, 256):
                data = codec.encode(arr)
                lo = data[4:8].view("<f4")[0]
                assert lo == 0 and not np.signbit(lo)
                assert not np.signbit(data[0:4].view("<f4")[0])


# -- unusual buffers -------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_misaligned_and_strided_buffers_fall_back(cls: type[MinMaxCodec]) -> None:
    fast, ref = pair(cls, 7)
    x = make_vector("normal", 1001, 3)
    raw = b"\x00" + x.tobytes()
    unaligned = np.frombuffer(raw, np.float32, offset=1)
    assert not unaligned.flags.aligned and unaligned.flags.c_contiguous
    data = ref.encode(x)
    assert fast.encode(unaligned).tobytes() == data.tobytes()
    strided = np.repeat(data, 2)[::2]
    assert not strided.flags.c_contiguous
    padded = b"\x00" + data.tobytes()
    for buf in (data, data.tobytes(), memoryview(padded)[1:], strided, bytearray(data)):
        assert_same_decodes(fast, ref, buf, 1001)
    out = np.frombuffer(bytearray(4 * 1001 + 1), np.float32, offset=1)
    assert fast.decode(data, 1001, out=out).tobytes() == ref.decode(data, 1001).tobytes()
    acc = np.frombuffer(bytearray(4 * 1001 + 1), np.float32, offset=1)
    fast.decode_add(data, acc, np.empty(1001, np.float32))
    assert acc.tobytes() == ref.decode(data, 1001).tobytes()


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_arguments_raise_the_same_errors(cls: type[MinMaxCodec]) -> None:
    fast, ref = pair(cls, 64)
    x = make_vector("normal", 300, 5)
    data = ref.encode(x)
    corrupt = data.copy()
    corrupt[0:4] = np.array([np.nan], "<f4").view(np.uint8)
    bad_outs: list[Any] = [np.empty(299, np.float32), np.empty(300, np.float64), np.empty(600)]
    scratch = np.empty(300, np.float32)
    for encoded in (data, corrupt, data[:-1]):
        for out in bad_outs:
            # Which check fires first (data or out) must not change either.
            assert same(fast, ref, "decode", encoded, 300, out=out)[0] is not None
            assert same(fast, ref, "decode_add", encoded, out, scratch)[0] is not None
            assert same(fast, ref, "decode_add", encoded, scratch, out)[0] is not None
    for bad in (x.astype(np.float64), x[::2], [1.0]):
        for codec in (fast, ref):
            with pytest.raises(InvalidArgument):
                codec.encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", CLASSES)
def test_overlapping_buffers_fall_back(cls: type[MinMaxCodec]) -> None:
    fast, ref = pair(cls, 16)
    n = 100
    data = ref.encode(make_vector("normal", n, 2))
    out = np.empty(n, np.float32)
    shared = np.zeros(data.shape[0] + 4 * n, np.uint8)
    shared[: data.shape[0]] = data
    view_data = shared[: data.shape[0]]
    view_out = shared[4 : 4 + 4 * n].view(np.float32)  # overlaps the header
    assert _minmax.decode(view_data, n, 16, cls.bits, view_out, None) == 2
    assert _minmax.decode(view_data, n, 16, cls.bits, out, view_out) == 2
    x = make_vector("normal", n, 3)
    assert _minmax.encode(x, x.view(np.uint8)[: ref.encoded_nbytes(n)], n, 16, cls.bits) == 2
    want = shared.copy()
    ref.decode(want[: data.shape[0]], n, out=want[4 : 4 + 4 * n].view(np.float32))
    fast.decode(view_data, n, out=view_out)
    assert shared.tobytes() == want.tobytes()


@pytest.mark.parametrize("cls", CLASSES)
def test_block_size_beyond_ssize_t(cls: type[MinMaxCodec]) -> None:
    fast, ref = pair(cls, 2**70)
    x = make_vector("normal", 1001, 4)
    data = same(fast, ref, "encode", x)[2]
    assert data == cls(1001, accelerated=False).encode(x).tobytes()
    assert_same_decodes(fast, ref, data, 1001)
    assert_same_decodes(fast, ref, b"", 0)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("block_size", [1, 7, 256])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_the_same_error(
    cls: type[MinMaxCodec], block_size: int, value: float
) -> None:
    fast, ref = pair(cls, block_size)
    for pos in (0, 1, 255, 256, 999):
        for other in (None, 5, 998):
            x = make_vector("normal", 1000, pos)
            x[pos] = value
            if other is not None:
                x[other] = -value
            assert same(fast, ref, "encode", x)[0] is NonFiniteError


@pytest.mark.parametrize("cls", CLASSES)
def test_range_overflow_raises_the_same_error(cls: type[MinMaxCodec]) -> None:
    top = np.finfo(np.float32).max
    cases: list[list[Any]] = [
        [-3e38, 3e38, 0.0],
        [3.0e38, top],
        [-top, top],
        [top, top, -1.0],
        [top, 3e38],
    ]
    for block_size in (2, 3, 256):
        fast, ref = pair(cls, block_size)
        for case in cases:
            x = np.array([1.0, 2.0, *case], np.float32)
            same(fast, ref, "encode", x)


@pytest.mark.parametrize("cls", CLASSES)
@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 100),
    block_size=st.sampled_from([1, 3, 16]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    specials=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 3e38])),
        max_size=2,
    ),
)
def test_corrupt_headers_raise_the_same_error(
    cls: type[MinMaxCodec],
    n: int,
    block_size: int,
    flips: list[tuple[int, int]],
    specials: list[tuple[int, float]],
) -> None:
    fast, ref = pair(cls, block_size)
    data = ref.encode(make_vector("normal", n, n))
    nb = -(-n // block_size)
    for where, byte in flips:
        data[where % (8 * nb)] = byte  # header bytes only
    for where, value in specials:
        field = where % (2 * nb)  # a scale or a min
        data[4 * field : 4 * field + 4] = np.array([value], "<f4").view(np.uint8)
    assert_same_decodes(fast, ref, data, n, np.ones(n, np.float32))


@pytest.mark.parametrize("cls", CLASSES)
@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), n=st.integers(0, 120), block_size=st.sampled_from([1, 16]))
def test_random_bytes_same_outcome(
    cls: type[MinMaxCodec], data: bytes, n: int, block_size: int
) -> None:
    fast, ref = pair(cls, block_size)
    assert_same_decodes(fast, ref, data, n)


@pytest.mark.parametrize("n", [1, 5, 4097])
def test_uint4_padding_nibble_same_error(n: int) -> None:
    fast, ref = pair(Uint4Codec, 7)
    data = ref.encode(make_vector("uniform", n, 1))
    data[-1] |= 0x10
    assert outcome(fast.decode, data, n)[0] is CodecError
    assert_same_decodes(fast, ref, data, n)


# -- threads ---------------------------------------------------------------------------


def test_concurrent_calls_without_the_gil() -> None:
    codec, ref = pair(Uint8Codec, 256)
    x = make_vector("normal", 1 << 18, 9)
    want = ref.encode(x).tobytes()
    errors: list[str] = []

    def work() -> None:
        for _ in range(5):
            data = codec.encode(x)
            if data.tobytes() != want:
                errors.append("encode")
            acc = np.zeros(x.shape[0], np.float32)
            codec.decode_add(data, acc, np.empty_like(acc))
            if acc.tobytes() != ref.decode(data, x.shape[0]).tobytes():
                errors.append("decode_add")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
