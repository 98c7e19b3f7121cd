"""Values on a few bits with a scale per group (collnet_client.lowbit), against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from collnet_client.lowbit import dequantize, levels, quantize
from collnet_client.lowbit import pack_codes as pack
from collnet_client.lowbit import packed_nbytes as nbytes
from collnet_client.lowbit import unpack_codes as unpack
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOATS = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
BITS = st.sampled_from([2, 4, 8])


@settings(max_examples=200, deadline=None)
@given(groups=st.lists(st.integers(1, 20), min_size=1, max_size=6), bits=BITS, data=st.data())
def test_quantize_is_the_per_group_symmetric_rounding_and_dequantize_undoes_it_within_half_a_step(
    groups: list[int], bits: int, data: st.DataObject
) -> None:
    values = data.draw(hnp.arrays(np.float32, sum(groups), elements=FLOATS))
    codes, scales = quantize(values, groups, bits)
    top = levels(bits)
    assert codes.dtype == np.uint8 and scales.dtype == np.float32
    assert len(scales) == len(groups) and int(codes.max()) <= 2 * top
    back = dequantize(codes, scales, groups, bits)
    start = 0
    for g, scale in zip(groups, scales, strict=True):
        part, got = values[start : start + g], back[start : start + g]
        # The reference, one group at a time in float64.
        peak = float(np.abs(part).max())
        assert scale == np.float32(np.float32(peak) / np.float32(top))
        if scale > 0:
            ref = np.clip(np.rint(part / scale), -top, top) - 0.0
            np.testing.assert_array_equal(codes[start : start + g].astype(int) - top, ref)
            # Half a step of rounding, and a few ulps for the float32 arithmetic.
            assert np.all(np.abs(got - part) <= scale * (0.5 + 1e-5) + 1e-6 * np.abs(part))
        else:
            assert np.all(got == 0) and np.all(codes[start : start + g] == top)
        start += g
    # The decode is plain float32 arithmetic: the same bits every time.
    assert dequantize(codes, scales, groups, bits).tobytes() == back.tobytes()


def test_the_largest_value_of_a_group_keeps_its_magnitude_and_signs_survive() -> None:
    values = np.array([3.0, -1.0, 0.2, -6.0, 0.0, 2.5], np.float32)
    for bits in (2, 4, 8):
        codes, scales = quantize(values, [3, 3], bits)
        back = dequantize(codes, scales, [3, 3], bits)
        assert back[0] == pytest.approx(3.0, rel=1e-6)
        assert back[3] == pytest.approx(-6.0, rel=1e-6)
        assert np.all(np.sign(back[np.abs(back) > 0]) == np.sign(values[np.abs(back) > 0]))
    # Two bits are ternary: -scale, 0 or +scale.
    codes, scales = quantize(values, [6], 2)
    assert set(dequantize(codes, scales, [6], 2).tolist()) <= {-6.0, 0.0, 6.0}


@settings(max_examples=200, deadline=None)
@given(bits=BITS, data=st.data())
def test_packed_codes_round_trip_and_take_bits_over_eight_bytes_each(
    bits: int, data: st.DataObject
) -> None:
    count = data.draw(st.integers(0, 50))
    codes = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count,
                                        max_size=count)), np.uint8)  # fmt: skip
    packed = pack(codes, bits)
    assert packed.size == nbytes(count, bits) == -(-count * bits // 8)
    assert np.array_equal(unpack(packed, count, bits), codes)
    # The reference layout: code i sits at bit (i * bits) of the little-endian stream.
    stream = sum(int(c) << (i * bits) for i, c in enumerate(codes))
    assert packed.tobytes() == stream.to_bytes(packed.size, "little")


def test_malformed_input_is_refused() -> None:
    with pytest.raises(ValueError):
        levels(3)
    with pytest.raises(ValueError):
        quantize(np.ones(3, np.float32), [2], 4)  # groups do not cover the values
    with pytest.raises(ValueError):
        quantize(np.ones(3, np.float32), [3, 0], 4)  # an empty group
    with pytest.raises(ValueError):
        quantize(np.array([1.0, np.nan], np.float32), [2], 4)
    with pytest.raises(ValueError):
        dequantize(np.array([15], np.uint8), np.ones(1, np.float32), [1], 4)  # above 2L = 14
    with pytest.raises(ValueError):
        unpack(np.zeros(2, np.uint8), 5, 4)  # 5 four-bit codes take 3 bytes
