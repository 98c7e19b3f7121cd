"""Top-k selection with error feedback and the sparse average (collnet_client.sparse)."""

from __future__ import annotations

import numpy as np
import pytest
from collnet_client.lowbit import dequantize, quantize
from collnet_client.sparse import MAX_CHUNK, TopK, average, chunked, keep_count, pack, unpack
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOATS = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
CHUNKS = st.lists(st.integers(1, 40), min_size=1, max_size=5)


def _vector(data: st.DataObject, n: int) -> np.ndarray:
    return data.draw(hnp.arrays(np.float32, n, elements=FLOATS))


@settings(max_examples=150, deadline=None)
@given(chunks=CHUNKS, density=st.floats(0.01, 1.0), data=st.data())
def test_topk_sends_the_largest_of_each_chunk_and_keeps_the_rest_exactly(
    chunks: list[int], density: float, data: st.DataObject
) -> None:
    n = sum(chunks)
    x, r = _vector(data, n), _vector(data, n)
    acc = x + r
    sel = TopK(chunks, density)
    residual = r.copy()
    idx, vals = sel.compress(x.copy(), residual)
    assert idx.dtype == np.int32 and vals.dtype == np.float32
    assert len(idx) == sel.kept == sum(keep_count(c, density) for c in chunks)
    assert np.all(np.diff(idx) > 0)
    # Sent plus kept is the input plus the old residual, bit for bit.
    rebuilt = residual.copy()
    rebuilt[idx] += vals
    assert np.array_equal(rebuilt, acc)
    assert np.array_equal(vals, acc[idx]) and np.all(residual[idx] == 0)
    # Within every chunk, nothing left behind is larger than what was sent.
    start = 0
    for c in chunks:
        inside = (idx >= start) & (idx < start + c)
        assert inside.sum() == keep_count(c, density)
        rest = np.delete(np.abs(acc[start : start + c]), idx[inside] - start)
        if rest.size:
            assert rest.max() <= np.abs(vals[inside]).min()
        start += c


def test_error_feedback_sends_everything_eventually() -> None:
    # A constant input at 25% density: a small coordinate's residual grows until it
    # outranks the large ones, so every coordinate goes out, and none is lost.
    sel = TopK([8], 0.25)
    residual = np.zeros(8, np.float32)
    x = np.arange(1, 9, dtype=np.float32)
    total = np.zeros(8, np.float32)
    for _ in range(40):
        idx, vals = sel.compress(x.copy(), residual)
        total[idx] += vals
    np.testing.assert_allclose(total + residual, 40 * x)
    assert np.all(total > 0)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 60), peers=st.integers(1, 5), data=st.data())
def test_average_of_packed_parts_is_the_dense_mean_and_the_same_bits_everywhere(
    n: int, peers: int, data: st.DataObject
) -> None:
    sel = TopK([n], data.draw(st.floats(0.05, 1.0)))
    parts, dense = [], []
    for _ in range(peers):
        x = _vector(data, n)
        idx, vals = sel.compress(x, np.zeros(n, np.float32))
        parts.append(pack(idx, vals))
        d = np.zeros(n, np.float32)
        d[idx] = vals
        dense.append(d)
    out = average(parts, np.empty(n, np.float32))
    ref = np.zeros(n, np.float32)
    for d in dense:
        ref += d
    ref /= np.float32(peers)
    assert np.array_equal(out, ref)
    # Every rank holds the same parts in the same order: the same bits.
    assert average(parts, np.empty(n, np.float32)).tobytes() == out.tobytes()


def test_pack_round_trips_and_unpack_refuses_what_a_peer_could_not_have_sent() -> None:
    idx = np.array([0, 3, 7], np.int32)
    vals = np.array([1.5, -np.inf, 2.0], np.float32)
    got_idx, got_vals = unpack(pack(idx, vals), 8)
    assert np.array_equal(got_idx, idx) and np.array_equal(got_vals, vals)
    with pytest.raises(ValueError):
        unpack(pack(idx, vals), 7)  # index 7 out of range
    with pytest.raises(ValueError):
        unpack(np.zeros(3, np.int32), 8)  # odd length
    with pytest.raises(ValueError):
        unpack(pack(np.array([3, 3], np.int32), vals[:2]), 8)  # repeated index


def test_density_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        TopK([4], 0.0)
    with pytest.raises(ValueError):
        TopK([4], 1.5)


@settings(max_examples=150, deadline=None)
@given(chunks=CHUNKS, density=st.floats(0.01, 1.0), decay=st.floats(0.0, 1.0, width=32),
       bits=st.sampled_from([2, 4, 8]), data=st.data())  # fmt: skip
def test_quantized_parts_carry_the_top_k_of_the_decayed_sum_and_the_residual_keeps_the_rounding(
    chunks: list[int], density: float, decay: float, bits: int, data: st.DataObject
) -> None:
    n = sum(chunks)
    x, r = _vector(data, n), _vector(data, n)
    sel = TopK(chunks, density, decay, bits)
    acc = x + np.float32(decay) * r
    residual = r.copy()
    part = sel.encode(x.copy(), residual)
    assert part.dtype == np.int32 and part.nbytes == sel.part_nbytes
    # 4-byte scale per chunk, 2-byte index and bits/8 bytes per value, padded to 4.
    raw = 4 * len(chunks) + 2 * sel.kept + -(-sel.kept * bits // 8)
    assert sel.part_nbytes == -(-raw // 4) * 4
    idx, vals = sel.decode(part)
    # The reference: the same selection as fp32 top-k, then the per-chunk quantizer.
    ref_idx, ref_acc = TopK(chunks, density).compress(acc.copy(), np.zeros(n, np.float32))
    assert np.array_equal(idx, ref_idx) and np.array_equal(ref_acc, acc[idx])
    keeps = [keep_count(c, density) for c in chunks]
    codes, scales = quantize(acc[idx], keeps, bits)
    assert vals.tobytes() == dequantize(codes, scales, keeps, bits).tobytes()
    # Sent plus kept is the decayed sum, up to the rounding of one subtraction.
    rebuilt = residual.copy()
    rebuilt[idx] += vals
    np.testing.assert_allclose(rebuilt, acc, rtol=1e-6, atol=1e-6 * float(np.abs(acc).max()))
    np.testing.assert_array_equal(np.delete(residual, idx), np.delete(acc, idx))


def test_a_decay_below_one_lets_an_unsent_residual_fade() -> None:
    sel = TopK([4], 0.25, decay=0.5)
    residual = np.zeros(4, np.float32)
    sel.compress(np.array([8, 4, 0, 0], np.float32), residual)
    assert residual.tolist() == [0, 4, 0, 0]
    idx, vals = sel.compress(np.zeros(4, np.float32), residual)
    assert idx.tolist() == [1] and vals.tolist() == [2]  # 0.5 * 4
    assert residual.tolist() == [0, 0, 0, 0]


@settings(max_examples=60, deadline=None)
@given(chunks=CHUNKS, peers=st.integers(1, 5), bits=st.sampled_from([2, 4, 8, 32]),
       data=st.data())  # fmt: skip
def test_average_of_encoded_parts_is_the_dense_mean_in_rank_order(
    chunks: list[int], peers: int, bits: int, data: st.DataObject
) -> None:
    n = sum(chunks)
    sel = TopK(chunks, data.draw(st.floats(0.05, 1.0)), 0.9, bits)
    parts, ref = [], np.zeros(n, np.float32)
    for _ in range(peers):
        part = sel.encode(_vector(data, n), np.zeros(n, np.float32))
        parts.append(part)
        idx, vals = sel.decode(part)
        ref[idx] += vals
    ref /= np.float32(peers)
    out = sel.average(parts, np.empty(n, np.float32))
    assert out.tobytes() == ref.tobytes()


def test_chunked_cuts_every_tensor_and_uint16_indices_need_small_chunks() -> None:
    assert chunked([10, 3, 8], 4) == [4, 4, 2, 3, 4, 4]
    assert chunked([MAX_CHUNK + 1], MAX_CHUNK) == [MAX_CHUNK, 1]
    with pytest.raises(ValueError):
        chunked([10], MAX_CHUNK + 1)
    with pytest.raises(ValueError):
        TopK([MAX_CHUNK + 1], 0.01, bits=4)
    with pytest.raises(ValueError):
        TopK([8], 0.5, decay=1.5)
    with pytest.raises(ValueError):
        TopK([8], 0.5, bits=3)


def test_decode_refuses_a_part_no_peer_could_have_encoded() -> None:
    sel = TopK([6, 4], 0.5, bits=4)  # 3 + 2 values kept
    part = sel.encode(np.arange(10, dtype=np.float32), np.zeros(10, np.float32))
    sel.decode(part)
    data = part.view(np.uint8)
    with pytest.raises(ValueError):
        sel.decode(part[:-1])  # short
    bad = data.copy()
    bad[8:10] = np.frombuffer(np.uint16(6).tobytes(), np.uint8)  # index 6 in a chunk of 6
    with pytest.raises(ValueError, match="chunk"):
        sel.decode(bad.view(np.int32))
    bad = data.copy()
    bad[8:12] = np.frombuffer(np.array([2, 1], np.uint16).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="ascending"):
        sel.decode(bad.view(np.int32))
    bad = data.copy()
    bad[0:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="scale"):
        sel.decode(bad.view(np.int32))
    bad = data.copy()
    bad[18] = 0xFF  # two 4-bit codes of 15, above 2L = 14
    with pytest.raises(ValueError):
        sel.decode(bad.view(np.int32))
