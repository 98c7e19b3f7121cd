"""Streaming DiLoCo's fragments and schedule, as pure functions."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")  # the package imports torch; the module itself does not
from collnet_client.torch.fragments import Schedule, split

SIZES = st.lists(st.integers(1, 50), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(sizes=SIZES, data=st.data())
def test_split_covers_every_parameter_once_in_order_with_the_smallest_possible_largest_fragment(
    sizes: list[int], data: st.DataObject
) -> None:
    n = data.draw(st.integers(1, len(sizes)))
    frags = split(sizes, n)
    assert len(frags) == n
    assert [i for f in frags for i in f.params] == list(range(len(sizes)))
    assert all(len(f.params) > 0 for f in frags)
    assert [f.index for f in frags] == list(range(n))
    offset = 0
    for f in frags:
        assert f.start == offset and f.size == sum(sizes[i] for i in f.params)
        offset = f.stop
    assert offset == sum(sizes)
    # Brute force over every contiguous cut into n non-empty groups.
    best = min(
        max(sum(sizes[a:b]) for a, b in itertools.pairwise((0, *cuts, len(sizes))))
        for cuts in itertools.combinations(range(1, len(sizes)), n - 1)
    )
    assert max(f.size for f in frags) == best


def test_split_refuses_more_fragments_than_parameters() -> None:
    with pytest.raises(ValueError):
        split([3, 4], 3)
    with pytest.raises(ValueError):
        split([3, 4], 0)


@settings(max_examples=100, deadline=None)
@given(fragments=st.integers(1, 8), per=st.integers(1, 6), data=st.data())
def test_every_fragment_syncs_once_per_inner_steps_staggered_evenly(
    fragments: int, per: int, data: st.DataObject
) -> None:
    inner = fragments * per
    overlap = data.draw(st.integers(0, per))
    s = Schedule(inner, fragments, overlap)
    steps = range(1, 3 * inner + 1)
    synced = [(t, s.fragment_at(t)) for t in steps if s.fragment_at(t) is not None]
    # One sync every interval steps, fragments in turn: each once per inner_steps.
    assert [t for t, _ in synced] == list(range(per, 3 * inner + 1, per))
    assert [f for _, f in synced] == [k % fragments for k in range(len(synced))]
    for f in range(fragments):
        at = [t for t, g in synced if g == f]
        assert all(b - a == inner for a, b in itertools.pairwise(at))
    # A joiner that adopts k syncs resumes at the step where the members stand.
    assert all(s.fragment_at(s.step_of(k)) == s.fragment_of(k - 1) for k in range(1, 10))
    # The exchange started at a sync lands before the next one starts.
    assert all(t + s.overlap <= t + s.interval for t, _ in synced)


def test_blocking_is_one_fragment_every_inner_steps() -> None:
    s = Schedule(5)
    assert [t for t in range(1, 16) if s.fragment_at(t) is not None] == [5, 10, 15]
    assert s.overlap == 0 and s.fragment_at(0) is None


@pytest.mark.parametrize(
    ("inner", "fragments", "overlap"), [(10, 3, 0), (10, 0, 0), (8, 4, 3), (8, 2, -1), (0, 1, 0)]
)
def test_schedule_refuses_what_cannot_be_staggered(
    inner: int, fragments: int, overlap: int
) -> None:
    with pytest.raises(ValueError):
        Schedule(inner, fragments, overlap)
