"""The peer's side of membership (``PeerMembership``) without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collnet.errors import InvalidArgument, PeerLost
from collnet.membership.peer import HISTORY, PeerMembership
from collnet.membership.world import PeerInfo, WorldView


def _world(epoch: int, *ids: str) -> WorldView:
    return WorldView(epoch, tuple(PeerInfo(i, "127.0.0.1", 1) for i in ids))


def test_a_new_epoch_reports_who_left_and_that_the_world_moved() -> None:
    m = PeerMembership("a")
    first = m.apply(_world(1, "a", "b", "c"))
    assert first is not None and first.moved and first.gone == frozenset()
    change = m.apply(_world(2, "a", "c"))
    assert change is not None and change.moved and change.gone == {"b"}
    assert change.member("a") and m.is_member


def test_an_older_world_arriving_late_is_ignored() -> None:
    m = PeerMembership("a")
    m.apply(_world(3, "a", "b"))
    assert m.apply(_world(2, "a")) is None
    assert m.world.epoch == 3 and m.world.ids == ("a", "b")


def test_the_same_epoch_again_is_not_news() -> None:
    m = PeerMembership("a")
    m.apply(_world(1, "a", "b"))
    change = m.apply(_world(1, "a", "b"))
    assert change is not None and not change.moved and not change.gone


def test_a_request_for_the_agreed_epoch_runs_there_with_this_peers_rank() -> None:
    m = PeerMembership("b")
    m.apply(_world(4, "a", "b"))
    assert m.agreed(4) == (m.world, 1)
    assert m.agreed(None) == (m.world, 1)


def test_a_request_for_an_older_epoch_fails_with_peer_lost_naming_who_left() -> None:
    m = PeerMembership("a")
    m.apply(_world(1, "a", "b", "c"))
    m.apply(_world(2, "a", "c"))
    with pytest.raises(PeerLost, match="update_topology") as info:
        m.agreed(1)
    assert info.value.peer == "b" and info.value.fields["epoch"] == 1


def test_a_request_for_a_future_epoch_or_from_a_non_member_is_invalid() -> None:
    m = PeerMembership("z")
    m.apply(_world(2, "a"))
    with pytest.raises(InvalidArgument, match="bad epoch"):
        m.agreed(3)
    with pytest.raises(InvalidArgument, match="not an active member"):
        m.agreed(2)


def test_a_collective_set_up_before_the_epoch_moved_is_no_longer_current() -> None:
    m = PeerMembership("a")
    old = _world(5, "a", "b")
    m.apply(old)
    m.check_current(old, "all_reduce")
    # Dropped while frozen and re-admitted: the same members, another epoch.
    m.apply(_world(7, "a", "b"))
    with pytest.raises(PeerLost, match="re-admitted") as info:
        m.check_current(old, "all_reduce")
    assert info.value.peer == "a"


def test_after_a_reconnect_a_peer_dropped_from_the_world_is_told_so() -> None:
    m = PeerMembership("a")
    world = _world(3, "a", "b")
    m.apply(world)
    m.check_still_member(world, "sync_state")
    m.apply(_world(3, "b"))  # the same epoch, reported without this peer
    with pytest.raises(PeerLost, match="removed from the world"):
        m.check_still_member(world, "sync_state")


@given(st.lists(st.integers(1, 500), min_size=1, max_size=200))
def test_worlds_only_move_forward_and_the_history_is_bounded(epochs: list[int]) -> None:
    m = PeerMembership("a")
    for epoch in epochs:
        m.apply(_world(epoch, "a"))
    assert m.world.epoch == max(epochs)
    assert m.world_at(max(epochs)) is m.world
    assert len(m._history) <= HISTORY
