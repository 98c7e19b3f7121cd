"""Top-k selection with error feedback and the sparse average (collnet_client.sparse)."""

from __future__ import annotations

import numpy as np
import pytest
from collnet_client.sparse import TopK, average, keep_count, pack, unpack
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
