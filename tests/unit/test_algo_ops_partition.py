"""Reduce ops and the segment/chunk partition of the all-reduce schedules."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collnet.algo.ops import DTYPES, OPS, check_op, combine, finalize
from collnet.algo.partition import (
    Partition,
    check_group,
    chunk_bounds,
    chunk_elems_for,
    segment_bounds,
)
from collnet.errors import InvalidArgument

BF16 = np.dtype(ml_dtypes.bfloat16)


@given(
    n=st.integers(0, 300),
    world=st.integers(1, 17),
    chunk_elems=st.integers(1, 40),
)
@settings(max_examples=200, deadline=None)
def test_partition_tiles_like_array_split_with_nonempty_chunks(
    n: int, world: int, chunk_elems: int
) -> None:
    part = Partition(n, world, chunk_elems)
    expected = np.array_split(np.arange(n), world)
    assert [part.segment(k) for k in range(world)] == segment_bounds(n, world)
    covered: list[int] = []
    for k in range(world):
        start, stop = part.segment(k)
        assert list(range(start, stop)) == expected[k].tolist()
        chunks = [part.chunk(k, c) for c in range(part.num_chunks(k))]
        assert chunks == chunk_bounds(start, stop, chunk_elems)
        for a, b in chunks:
            assert 1 <= b - a <= chunk_elems
            covered.extend(range(a, b))
        assert part.num_chunks(k) <= part.max_chunks()
    assert covered == list(range(n))


def test_partition_empty_segments_have_no_chunks() -> None:
    part = Partition(2, 5, 4)
    assert [part.num_chunks(k) for k in range(5)] == [1, 1, 0, 0, 0]
    assert Partition(0, 3, 1).max_chunks() == 0
    assert chunk_bounds(4, 4, 3) == []


def test_partition_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgument):
        Partition(-1, 2, 1)
    with pytest.raises(InvalidArgument):
        Partition(4, 0, 1)
    with pytest.raises(InvalidArgument):
        Partition(4, 2, 0)
    with pytest.raises(InvalidArgument):
        chunk_elems_for(0, 4)
    with pytest.raises(InvalidArgument):
        check_group(3, 3)
    with pytest.raises(InvalidArgument):
        check_group(0, 0)
    assert chunk_elems_for(3, 4) == 1
    assert chunk_elems_for(1 << 20, 2) == 1 << 19


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_combine_in_place_matches_numpy(dtype: np.dtype, op: str) -> None:
    if op == "avg" and dtype.kind == "i":
        with pytest.raises(InvalidArgument, match="avg"):
            check_op(op, dtype)
        return
    check_op(op, dtype)
    rng = np.random.default_rng(0)
    acc = rng.integers(-3, 4, size=33).astype(dtype)
    inc = rng.integers(-3, 4, size=33).astype(dtype)
    ref = {
        "sum": np.add,
        "avg": np.add,
        "min": np.minimum,
        "max": np.maximum,
        "prod": np.multiply,
    }[op](acc.astype(np.float64), inc.astype(np.float64))
    before = acc.__array_interface__["data"][0]
    combine(op, acc, inc)
    assert acc.__array_interface__["data"][0] == before
    assert acc.dtype == dtype
    np.testing.assert_array_equal(acc.astype(np.float64), ref)


def test_bfloat16_combine_rounds_like_float32_then_cast() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal(1000).astype(BF16)
    b = (rng.standard_normal(1000) * 1e-3).astype(BF16)
    expected = (a.astype(np.float32) + b.astype(np.float32)).astype(BF16)
    combine("sum", a, b)
    assert a.view(np.uint16).tolist() == expected.view(np.uint16).tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("world", [1, 3, 8, 257, 3001])
def test_finalize_avg_divides_once(dtype: np.dtype, world: int) -> None:
    seg = (np.arange(12) * world).astype(dtype)
    ref = (seg.astype(np.float64) / world).astype(dtype)
    finalize("avg", seg, world)
    np.testing.assert_allclose(seg.astype(np.float64), ref.astype(np.float64), rtol=1e-2)
    for op in ("sum", "min", "max", "prod"):
        before = seg.copy()
        finalize(op, seg, world)
        np.testing.assert_array_equal(seg, before)


def test_check_op_rejects_unknown_op_and_dtype() -> None:
    with pytest.raises(InvalidArgument, match="unknown reduce op"):
        check_op("mean", np.dtype(np.float32))
    with pytest.raises(InvalidArgument, match="unsupported dtype"):
        check_op("sum", np.dtype(np.float64))
    with pytest.raises(InvalidArgument, match="unsupported dtype"):
        check_op("sum", np.dtype(np.uint8))
