"""A node's session (``Roster``) and the coordinator's side of a session that ends
and opens again, without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from collnet.membership.coordinator import CoordinatorState, Push, Reply
from collnet.membership.session import Roster
from collnet.membership.world import PeerInfo


def test_a_client_that_never_joined_changes_nothing() -> None:
    roster = Roster()
    roster.joined(b"trainer")
    assert not roster.gone(b"probe")
    assert roster.open and roster.knows(b"trainer")


def test_the_session_ends_when_the_last_trainer_is_gone() -> None:
    roster = Roster()
    roster.joined(b"a")
    roster.joined(b"b")
    assert not roster.gone(b"a"), "one trainer of two plain ones left: the node goes on"
    assert roster.gone(b"b")
    assert not roster.open


def test_one_trainer_of_a_local_group_gone_ends_the_session() -> None:
    roster = Roster()
    roster.joined(b"a", local_size=2)
    roster.joined(b"b", local_size=2)
    assert roster.gone(b"a")
    # The survivor stays a trainer of the node and counts in its next session.
    assert roster.knows(b"b") and not roster.open
    assert not roster.gone(b"b"), "an ended session ends once"


def test_a_trainer_that_joins_again_opens_the_session_once_registered() -> None:
    roster = Roster()
    roster.joined(b"old")
    assert roster.gone(b"old")
    roster.joined(b"new")
    assert not roster.open, "open only once the daemon registered again"
    roster.opened()
    assert roster.open
    assert roster.gone(b"new")


def test_a_trainer_counted_in_a_local_group_keeps_its_local_size() -> None:
    roster = Roster()
    roster.joined(b"a", local_size=2)
    roster.joined(b"a")  # a later call without local_size (a plain bench, say)
    roster.joined(b"b")
    assert roster.gone(b"a")


@given(st.lists(st.tuples(st.sampled_from(["join", "gone", "open"]), st.integers(0, 3))))
def test_the_session_ends_only_when_the_node_cannot_take_part(
    script: list[tuple[str, int]],
) -> None:
    roster = Roster()
    for action, who in script:
        ident = bytes([who])
        if action == "join":
            roster.joined(ident, local_size=1 + who % 2)
        elif action == "open":
            roster.opened()
        else:
            was_open, before = roster.open, dict(roster.trainers)
            ended = roster.gone(ident)
            assert ident not in roster.trainers
            local = before.get(ident)
            must_end = was_open and local is not None and (local > 1 or len(before) == 1)
            assert ended == must_end
            assert roster.open == (was_open and not ended)


def _peer(pid: str) -> PeerInfo:
    return PeerInfo(pid, "127.0.0.1", 1)


def test_a_member_whose_session_ended_registers_again_and_is_admitted_at_the_next_update() -> None:
    # The daemon's side: leave (the session ended), later register (a trainer joined
    # again). The coordinator's: a lost member, then a plain pending registration.
    state = CoordinatorState()
    for pid in "abc":
        state.register(_peer(pid))
    for rid, pid in enumerate("abc"):
        state.request_update(pid, rid, 0)
    assert state.world().ids == ("a", "b", "c")
    joined_epoch = state.epoch

    effects = state.leave("b")
    assert state.epoch == joined_epoch + 1
    assert {e.peer for e in effects if isinstance(e, Push)} == {"a", "c"}
    assert state.register(_peer("b")) == []
    assert state.world().pending == ("b",)

    # It waits in update_topology until every active member asks too.
    assert state.request_update("b", 10, state.epoch) == []
    assert state.request_update("a", 11, state.epoch) == []
    replies = [e for e in state.request_update("c", 12, state.epoch) if isinstance(e, Reply)]
    assert {r.peer for r in replies} == {"a", "b", "c"}
    assert {r.world.epoch for r in replies} == {joined_epoch + 2}
    assert set(state.world().ids) == {"a", "b", "c"} and state.world().pending == ()
