"""The coordinator's membership state machine, driven without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from collnet.errors import InvalidArgument, PeerLost, ProtocolError
from collnet.membership import (
    BarrierReply,
    CoordinatorState,
    Fail,
    PeerInfo,
    Push,
    Reply,
    WorldView,
)
from collnet.membership.bounds import EPOCH_HEADROOM, MAX_EPOCH, MAX_WORLD_PEERS


def peer(i: int) -> PeerInfo:
    return PeerInfo(f"p{i}", "127.0.0.1", 9000 + i)


def replies(effects: list[object]) -> dict[str, WorldView]:
    return {e.peer: e.world for e in effects if isinstance(e, Reply)}


def test_first_update_admits_all_pending_and_world_starts_from_one() -> None:
    s = CoordinatorState()
    for i in range(3):
        assert s.register(peer(i)) == []
    effects = s.request_update("p0", 1, 0)
    got = replies(effects)
    assert list(got) == ["p0"]
    assert got["p0"].epoch == 1 and got["p0"].ids == ("p0", "p1", "p2")
    # the others were admitted passively: pushed the world at once...
    assert {e.peer for e in effects if isinstance(e, Push)} == {"p1", "p2"}
    # ...and their own call returns at once, even at the pushed epoch
    assert replies(s.request_update("p1", 7, 1))["p1"].epoch == 1
    # after that, p1's calls are barrier calls again
    assert s.request_update("p1", 8, 1) == []


def test_joiner_waits_until_every_active_peer_calls_update() -> None:
    s = CoordinatorState()
    s.register(peer(0))
    s.register(peer(1))
    s.request_update("p0", 1, 0)
    s.request_update("p1", 1, 0)
    assert s.epoch == 1
    s.register(peer(2))
    assert s.world().pending == ("p2",)
    assert s.request_update("p2", 1, 0) == []
    assert s.request_update("p0", 2, 1) == []
    got = replies(s.request_update("p1", 2, 1))
    assert set(got) == {"p0", "p1", "p2"}
    assert {w.epoch for w in got.values()} == {2}
    assert got["p2"].ids == ("p0", "p1", "p2")


def test_update_without_pending_keeps_epoch() -> None:
    s = CoordinatorState()
    s.register(peer(0))
    s.request_update("p0", 1, 0)
    got = replies(s.request_update("p0", 2, 1))
    assert got["p0"].epoch == 1


def test_lost_peer_bumps_epoch_pushes_survivors_and_unblocks_barrier() -> None:
    s = CoordinatorState()
    for i in range(3):
        s.register(peer(i))
    s.request_update("p0", 1, 0)
    s.request_update("p1", 2, 0)  # passively admitted: answered at once
    s.register(peer(3))
    assert s.request_update("p0", 3, 1) == []
    assert s.request_update("p1", 4, 1) == []
    effects = s.lost("p2")
    pushes = {e.peer for e in effects if isinstance(e, Push)}
    assert pushes == {"p0", "p1", "p3"}  # the survivors, and p3 admitted while not asking
    assert s.epoch >= 2 and "p2" not in s.world().ids
    # every survivor was already waiting, so the barrier completes among them and
    # admits p3 in the same answer
    got = replies(effects)
    assert set(got) == {"p0", "p1"}
    assert got["p0"].ids == ("p0", "p1", "p3")


def test_a_survivor_answered_early_cannot_split_the_barrier() -> None:
    s = CoordinatorState()
    for i in range(3):
        s.register(peer(i))
    s.request_update("p0", 1, 0)
    s.request_update("p1", 2, 0)
    s.request_update("p2", 3, 0)
    assert s.request_update("p0", 4, 1) == []  # p0 waits; p1 is busy elsewhere
    effects = s.lost("p2")
    assert replies(effects) == {}, "p0 must keep waiting for p1"
    got = replies(s.request_update("p1", 5, 2))
    assert set(got) == {"p0", "p1"} and got["p0"].epoch == got["p1"].epoch == 2


def test_duplicate_and_unknown_peers_are_typed_errors() -> None:
    s = CoordinatorState()
    s.register(peer(0))
    with pytest.raises(InvalidArgument):
        s.register(peer(0))
    with pytest.raises(ProtocolError):
        s.request_update("nobody", 1, 0)
    s.request_update("p0", 1, 0)
    s.register(peer(1))
    s.request_update("p1", 2, 0)
    with pytest.raises(ProtocolError):
        s.request_update("p1", 3, 0)


def test_world_view_round_trips_and_rejects_garbage() -> None:
    w = WorldView(3, (peer(0), peer(1)), ("p9",))
    assert WorldView.from_wire(w.to_wire()) == w
    for bad in (
        None,
        {"epoch": "x"},
        {"epoch": 1, "peers": [["a", "h"]]},
        {"epoch": 1, "peers": [], "pending": [1]},
    ):
        with pytest.raises(ProtocolError):
            WorldView.from_wire(bad)


class MembershipMachine(RuleBasedStateMachine):
    """Random registrations, updates and losses keep the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.s = CoordinatorState()
        self.next = 0
        self.rid = 0
        self.last_epoch = 0
        self.known_epoch: dict[str, int] = {}

    @rule()
    def register(self) -> None:
        self.s.register(peer(self.next))
        self.known_epoch[f"p{self.next}"] = 0
        self.next += 1

    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        candidates = [p for p in self.known_epoch if p not in self.s.waiting]
        if not candidates:
            return
        pid = data.draw(st.sampled_from(sorted(candidates)))
        self.rid += 1
        self._apply(self.s.request_update(pid, self.rid, self.known_epoch[pid]))

    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        if not self.known_epoch:
            return
        pid = data.draw(st.sampled_from(sorted(self.known_epoch)))
        del self.known_epoch[pid]
        self._apply(self.s.lost(pid))

    @rule(data=st.data())
    def barrier(self, data: st.DataObject) -> None:
        waiting = self.s.barriers.get("b", {})
        candidates = [p for p in self.known_epoch if p not in waiting]
        if not candidates:
            return
        pid = data.draw(st.sampled_from(sorted(candidates)))
        self.rid += 1
        before = self.s.world()
        effects = self.s.request_barrier(pid, self.rid, "b", self.known_epoch[pid], pid.upper())
        answered = [e for e in effects if isinstance(e, BarrierReply)]
        if answered:
            # All or nothing: every member of the epoch, each with everyone's payload.
            assert {e.peer for e in answered} == set(before.ids)
            for e in answered:
                assert e.payloads == {p: p.upper() for p in before.ids}
        for e in effects:
            if isinstance(e, Fail):
                assert e.peer == pid and e.request_id == self.rid
                assert pid not in before.ids or self.known_epoch[pid] != before.epoch
        self._apply(effects)

    def _apply(self, effects: list[object]) -> None:
        for e in effects:
            assert e.peer in self.known_epoch  # type: ignore[attr-defined]
            if isinstance(e, BarrierReply | Fail):
                continue
            assert isinstance(e, Reply | Push)
            self.known_epoch[e.peer] = e.world.epoch
            if isinstance(e, Reply):
                assert e.peer in e.world.ids, "a reply always goes to an active member"

    @invariant()
    def epoch_never_decreases_and_sets_are_disjoint(self) -> None:
        w = self.s.world()
        assert w.epoch >= self.last_epoch
        self.last_epoch = w.epoch
        assert not set(w.ids) & set(w.pending)
        assert len(set(w.ids)) == len(w.ids)
        assert set(self.s.waiting) <= set(w.ids) | set(w.pending)

    @invariant()
    def no_active_peer_waits_forever_when_all_asked(self) -> None:
        ids = self.s.world().ids
        if ids:
            assert not all(p in self.s.waiting for p in ids)
            for waiting in self.s.barriers.values():
                assert set(waiting) < set(ids), "a barrier waits only for missing members"


TestMembershipMachine = MembershipMachine.TestCase
TestMembershipMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_restarted_coordinator_adopts_the_world_from_rejoining_members() -> None:
    world = WorldView(7, (peer(0), peer(1), peer(2)))
    s = CoordinatorState()
    s.register(PeerInfo("newbie", "127.0.0.1", 1))  # a pending joiner does not block adoption
    assert s.rejoin(peer(1), world) == (True, [])
    assert s.world().epoch == 7 and s.world().ids == ("p0", "p1", "p2")
    assert s.unconfirmed == {"p0", "p2"}
    assert s.rejoin(peer(0), world) == (True, [])
    # p2 never comes back: it is lost once the grace period ends
    effects = s.expire_unconfirmed()
    assert s.world().ids == ("p0", "p1") and s.world().epoch == 8
    assert {e.peer for e in effects if isinstance(e, Push)} == {"p0", "p1"}
    assert s.world().pending == ("newbie",)


def test_rejoin_with_a_stale_or_foreign_world_is_a_plain_registration() -> None:
    s = CoordinatorState()
    s.rejoin(peer(0), WorldView(5, (peer(0), peer(1))))
    # p1 reports an older epoch than the adopted one: it must rejoin as pending
    member, effects = s.rejoin(peer(1), WorldView(4, (peer(0), peer(1))))
    assert member is False and "p1" in s.world().pending
    assert s.world().ids == ("p0",) and [e.peer for e in effects if isinstance(e, Push)] == ["p0"]
    # a peer reporting a world it is not in is just a registration
    assert s.rejoin(peer(3), WorldView(5, (peer(0),)))[0] is False
    assert "p3" in s.world().pending
    with pytest.raises(InvalidArgument):
        s.rejoin(peer(0), WorldView(5, (peer(0), peer(1))))


BAD_CLAIMS = [
    pytest.param(WorldView(2**64 - 1, (peer(0), peer(1))), "out of range", id="epoch-2**64-1"),
    pytest.param(WorldView(MAX_EPOCH, (peer(0), peer(1))), "out of range", id="no-headroom"),
    pytest.param(
        WorldView(3, tuple(peer(i) for i in range(MAX_WORLD_PEERS + 1))), "at most", id="too-big"
    ),
    pytest.param(WorldView(3, (peer(0), peer(0))), "twice", id="member-twice"),
    pytest.param(
        WorldView(3, (peer(0), PeerInfo("bad\nid", "h", 1))), "bad member", id="bad-member-id"
    ),
    pytest.param(
        WorldView(3, (peer(0), PeerInfo("p1", "h", 0))), "bad member", id="bad-member-port"
    ),
    pytest.param(
        WorldView(3, (PeerInfo("p0", "10.9.9.9", 1), peer(1))), "registered", id="not-its-record"
    ),
]


@pytest.mark.parametrize(("world", "why"), BAD_CLAIMS)
def test_a_claimed_world_out_of_bounds_is_refused_and_changes_nothing(
    world: WorldView, why: str
) -> None:
    """Finding 4: a rejoining peer claiming epoch 2**64 - 1 wedged the coordinator
    (no later epoch bump could be encoded). Such a claim is a ProtocolError now,
    and the coordinator goes on as if it never came."""
    s = CoordinatorState()
    s.register(PeerInfo("newbie", "127.0.0.1", 1))
    before = s.world()
    with pytest.raises(ProtocolError, match=why):
        s.rejoin(peer(0), world)
    assert s.world() == before and not s.unconfirmed and not s.is_known("p0")
    # Still working: the joiner is admitted and the epoch bump is a plain +1.
    assert replies(s.request_update("newbie", 1, 0))["newbie"].epoch == 1
    assert s.rejoin(peer(0), WorldView(0, (peer(0),))) == (False, [])  # stale: pending


def test_a_claim_is_adopted_only_from_a_member_with_its_registered_record() -> None:
    world = WorldView(9, (peer(0), peer(1)))
    s = CoordinatorState()
    # A peer the claimed world does not name cannot hand it over.
    assert s.rejoin(peer(5), world) == (False, [])
    assert s.world().epoch == 0 and s.world().pending == ("p5",)
    assert s.rejoin(peer(0), world) == (True, [])
    assert s.world().epoch == 9 and s.unconfirmed == {"p1"}
    # A claim whose record of the claimant is not what it registers is refused...
    moved = PeerInfo("p1", "127.0.0.1", 1)
    with pytest.raises(ProtocolError, match=r"registered 127\.0\.0\.1:1"):
        s.rejoin(moved, world)
    assert s.unconfirmed == {"p1"}
    # ...and one that holds it elsewhere than the adopted world does is not this
    # world: p1 is not confirmed, it is out of it and pending.
    member, effects = s.rejoin(moved, WorldView(9, (peer(0), moved)))
    assert member is False and s.world().ids == ("p0",) and "p1" in s.world().pending
    assert [e.peer for e in effects if isinstance(e, Push)] == ["p0"]


def test_registrations_stop_at_max_world_peers() -> None:
    s = CoordinatorState()
    for i in range(MAX_WORLD_PEERS):
        s.register(PeerInfo(f"q{i}", "127.0.0.1", 1))
    with pytest.raises(InvalidArgument, match="world is full"):
        s.register(peer(0))
    s.lost("q0")
    assert s.register(peer(0)) == []


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(1, 6))
def test_any_adopted_epoch_leaves_room_for_every_later_bump(epoch: int, n: int) -> None:
    world = WorldView(epoch, tuple(peer(i) for i in range(n)))
    s = CoordinatorState()
    try:
        adopted, _ = s.rejoin(peer(0), world)
    except ProtocolError:
        assert epoch > MAX_EPOCH - EPOCH_HEADROOM
        assert s.epoch == 0 and not s.active
        return
    assert adopted and s.epoch == epoch <= MAX_EPOCH - EPOCH_HEADROOM
    for i in range(1, n):
        s.lost(f"p{i}")
    assert s.epoch == epoch + n - 1 <= MAX_EPOCH


def test_barrier_waits_for_members_until_they_reconnect_or_expire() -> None:
    """After a restart, answering the members that came back first would let them
    run ahead into their next collective while the late ones wait for them at
    this barrier (a split): the barrier waits for every member of the world."""
    s = CoordinatorState()
    s.rejoin(peer(0), WorldView(3, (peer(0), peer(1), peer(2))))
    assert s.request_update("p0", 1, 3) == []
    assert s.rejoin(peer(1), WorldView(3, (peer(0), peer(1), peer(2))))[0]
    assert s.request_update("p1", 2, 3) == []
    # p2 never comes back: once it expires, the barrier completes among the others.
    got = replies(s.expire_unconfirmed())
    assert set(got) == {"p0", "p1"} and got["p0"].ids == ("p0", "p1")


def test_state_barrier_answers_all_members_with_every_payload() -> None:
    s = CoordinatorState()
    for i in range(3):
        s.register(peer(i))
    s.request_update("p0", 1, 0)
    assert s.request_barrier("p0", 2, "state", 1, b"m0") == []
    assert s.request_barrier("p1", 3, "state", 1, b"m1") == []
    effects = s.request_barrier("p2", 4, "state", 1, b"m2")
    got = {e.peer: (e.request_id, e.payloads) for e in effects if isinstance(e, BarrierReply)}
    everyone = {"p0": b"m0", "p1": b"m1", "p2": b"m2"}
    assert got == {"p0": (2, everyone), "p1": (3, everyone), "p2": (4, everyone)}
    assert s.barriers == {}


def test_state_barrier_fails_on_a_loss_and_refuses_old_epochs_and_non_members() -> None:
    s = CoordinatorState()
    for i in range(3):
        s.register(peer(i))
    s.request_update("p0", 1, 0)
    s.request_barrier("p0", 2, "state", 1, b"m0")
    s.request_barrier("p1", 3, "state", 1, b"m1")
    effects = s.lost("p2")
    failed = {e.peer: e for e in effects if isinstance(e, Fail)}
    assert set(failed) == {"p0", "p1"}
    assert all(isinstance(e.error, PeerLost) for e in failed.values())
    assert not any(isinstance(e, BarrierReply) for e in effects), "never a partial answer"
    # A straggler still naming the old epoch fails at once instead of waiting.
    (late,) = s.request_barrier("p0", 5, "state", 1, b"m0")
    assert isinstance(late, Fail) and isinstance(late.error, PeerLost)
    s.register(peer(9))
    (joiner,) = s.request_barrier("p9", 6, "state", 2, b"x")
    assert isinstance(joiner, Fail) and isinstance(joiner.error, InvalidArgument)
    # A member that gave up on its call and calls again replaces its earlier call.
    assert s.request_barrier("p1", 7, "state", 2, b"old") == []
    effects = s.request_barrier("p1", 8, "state", 2, b"new")
    assert effects == []
    (answer,) = [e for e in s.request_barrier("p0", 9, "state", 2, b"m0") if e.peer == "p1"]
    assert isinstance(answer, BarrierReply) and answer.request_id == 8
    assert answer.payloads == {"p0": b"m0", "p1": b"new"}
