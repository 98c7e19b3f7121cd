"""The coordinator's membership state machine (sans-I/O).

Inputs are events (``register``, ``request_update``, ``lost``, ``leave``); each
returns the effects the service must perform (``Reply`` to a waiting
request, ``Push`` of a new world to members). Invariants:

- membership changes only at agreed points: pending peers are admitted when
  every active peer has asked for ``update_topology`` at the current epoch
  (with no active peers, the first request admits everyone pending, so a
  world can start from one peer);
- every change of the active set bumps the epoch, exactly once;
- every active member's ``update_topology`` is a real barrier call, whatever
  epoch it names: answering some members early (say, because a peer was lost
  meanwhile) would send them into the next collective while a slower survivor
  waits for them at the barrier;
- a peer admitted while not inside ``update_topology`` is pushed the new
  world at once, and its next ``update_topology`` returns that world;
- a lost or leaving peer is removed at once and the survivors are pushed the
  new world; waiting update requests stay waiting and the barrier is
  re-evaluated against the survivors;
- a named barrier (``request_barrier``, what shared-state sync is built on)
  completes when every active member of its epoch has arrived, and answers
  each with every member's payload; it belongs to one epoch, so any change of
  the world fails its waiting calls with ``PeerLost`` (the caller updates its
  topology and retries), never answering a partial set;
- the ring order (the order of ``active``, so rank = position) is chosen by
  ``planner`` (``collnet.topology.ringorder.RingPlanner``) only at an
  update_topology barrier, when every member waits: with the members admitted
  there, or, with none, as an epoch of its own when the planned order beats
  the current one by the planner's margin. A lost peer's survivors keep their
  order until then. Without a planner the order is the join order;
- each epoch publishes the link figures it was planned on (``costs``: worst
  RTT, ring bottleneck), fixed for the epoch; figures that became known or
  moved past the planner's tolerance are, like a better order, an epoch of
  their own at the next barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from collnet.errors import CollnetError, InvalidArgument, PeerLost, ProtocolError
from collnet.membership.bounds import MAX_WORLD_PEERS, check_claim
from collnet.membership.world import PeerInfo, WorldView
from collnet.topology.costmodel import LinkCosts
from collnet.topology.ringorder import RingPlanner


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer request ``request_id`` of ``peer`` with ``world``."""

    peer: str
    request_id: int
    world: WorldView


@dataclass(frozen=True, slots=True)
class Push:
    """Tell ``peer`` (an active member) about a new world."""

    peer: str
    world: WorldView


@dataclass(frozen=True, slots=True)
class BarrierReply:
    """Answer barrier request ``request_id`` of ``peer`` with every member's payload."""

    peer: str
    request_id: int
    name: str
    payloads: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer request ``request_id`` of ``peer`` with a typed error."""

    peer: str
    request_id: int
    error: CollnetError


Effect = Reply | Push | BarrierReply | Fail


@dataclass
class CoordinatorState:
    epoch: int = 0
    active: list[PeerInfo] = field(default_factory=list)
    pending: dict[str, PeerInfo] = field(default_factory=dict)
    # peer id -> request id of its outstanding update_topology call
    waiting: dict[str, int] = field(default_factory=dict)
    # peers admitted while not inside update_topology: they were pushed the
    # world, and their next update_topology returns it at once
    unannounced: set[str] = field(default_factory=set)
    # members of a world adopted from a rejoining peer (after a coordinator
    # restart) that have not reconnected yet
    unconfirmed: set[str] = field(default_factory=set)
    # barrier name -> peer id -> (request id, payload) of members waiting in it
    barriers: dict[str, dict[str, tuple[int, Any]]] = field(default_factory=dict)
    # peer id -> what it last reported at a "synced" barrier (soft state, for status)
    reported: dict[str, Any] = field(default_factory=dict)
    # Chooses the ring order at barriers (None: the join order).
    planner: RingPlanner | None = None
    # The current epoch's agreed link figures (see WorldView.costs).
    costs: LinkCosts | None = None

    def world(self) -> WorldView:
        return WorldView(self.epoch, tuple(self.active), tuple(self.pending), self.costs)

    def is_known(self, peer_id: str) -> bool:
        return peer_id in self.pending or any(p.id == peer_id for p in self.active)

    def register(self, peer: PeerInfo) -> list[Effect]:
        if self.is_known(peer.id):
            raise InvalidArgument(f"peer id {peer.id!r} is already registered")
        if len(self.active) + len(self.pending) >= MAX_WORLD_PEERS:
            # Every world this coordinator sends must parse on every daemon.
            raise InvalidArgument(f"the world is full ({MAX_WORLD_PEERS} peers)")
        self.pending[peer.id] = peer
        return []

    def rejoin(self, peer: PeerInfo, world: WorldView) -> tuple[bool, list[Effect]]:
        """A daemon reconnects and reports the world it is a member of.

        The coordinator keeps only soft state: after a restart, the first
        member to reconnect hands it back the world (epoch and ring order), and
        the others confirm it as they reconnect; ``expire_unconfirmed`` later
        removes those that never do. A report that does not match the world
        held here makes the daemon a plain (pending) registration. Returns
        whether the peer is an active member again, and the effects.

        ``peer`` is what the connection's identity registered (the caller
        decides who that is), so a world is taken back only from one of its
        members, and only within ``bounds.check_claim``: a world out of bounds
        (an epoch near 2**64, say, after which no epoch bump could be encoded)
        raises ``ProtocolError`` and changes nothing here.
        """
        if peer.id in self.pending or (self.is_known(peer.id) and peer.id not in self.unconfirmed):
            raise InvalidArgument(f"peer id {peer.id!r} is already registered")
        effects: list[Effect] = []
        if peer.id in world.ids:
            check_claim(peer, world)
            if not self.active and world.epoch >= self.epoch:
                self.epoch = world.epoch
                self.active = list(world.peers)
                self.costs = world.costs
                self.unconfirmed = set(world.ids) - {peer.id}
                return True, []
            held = next((p for p in self.active if p.id == peer.id), None)
            if peer.id in self.unconfirmed and world.epoch == self.epoch and held == peer:
                self.unconfirmed.discard(peer.id)
                return True, []
        if peer.id in self.unconfirmed:
            # It holds another world than the one recovered here: out of it first.
            effects = self.lost(peer.id)
        self.register(peer)
        return False, effects

    def expire_unconfirmed(self) -> list[Effect]:
        """Members that never reconnected after a restart are lost."""
        effects: list[Effect] = []
        for peer_id in sorted(self.unconfirmed):
            effects += self.lost(peer_id)
        return effects

    def request_update(self, peer_id: str, request_id: int, known_epoch: int) -> list[Effect]:
        if not self.is_known(peer_id):
            raise ProtocolError(f"update_topology from unregistered peer {peer_id!r}")
        if peer_id in self.waiting:
            raise ProtocolError(f"{peer_id} already has an update_topology in flight")
        if peer_id in self.unannounced:
            self.unannounced.discard(peer_id)
            return [Reply(peer_id, request_id, self.world())]
        self.waiting[peer_id] = request_id
        return self._maybe_advance()

    def request_barrier(
        self, peer_id: str, request_id: int, name: str, epoch: int, payload: Any
    ) -> list[Effect]:
        """``peer_id`` arrives at barrier ``name`` of ``epoch`` carrying ``payload``."""
        if not any(p.id == peer_id for p in self.active):
            return [
                Fail(
                    peer_id,
                    request_id,
                    InvalidArgument(
                        f"{peer_id} is not an active member: call update_topology first"
                    ),
                )
            ]
        if epoch != self.epoch:
            return [Fail(peer_id, request_id, self._world_changed(epoch))]
        waiting = self.barriers.setdefault(name, {})
        # A peer already waiting gave up on its earlier call (its own deadline)
        # and calls again: the new call replaces it.
        waiting[peer_id] = (request_id, payload)
        if any(p.id not in waiting for p in self.active):
            return []
        del self.barriers[name]
        payloads = {pid: entry[1] for pid, entry in waiting.items()}
        return [BarrierReply(pid, entry[0], name, payloads) for pid, entry in waiting.items()]

    def _world_changed(self, epoch: int) -> PeerLost:
        return PeerLost(
            f"the world changed during a barrier of epoch {epoch} (now epoch {self.epoch}): "
            "call update_topology, then retry",
            epoch=epoch,
        )

    def _fail_barriers(self, epoch: int) -> list[Effect]:
        effects: list[Effect] = []
        for waiting in self.barriers.values():
            for pid, (rid, _) in waiting.items():
                effects.append(Fail(pid, rid, self._world_changed(epoch)))
        self.barriers.clear()
        return effects

    def lost(self, peer_id: str) -> list[Effect]:
        """A peer died or left: remove it and tell the survivors."""
        self.waiting.pop(peer_id, None)
        self.unannounced.discard(peer_id)
        self.unconfirmed.discard(peer_id)
        self.reported.pop(peer_id, None)
        for waiting in self.barriers.values():
            waiting.pop(peer_id, None)
        if self.pending.pop(peer_id, None) is not None:
            return []
        before = len(self.active)
        self.active = [p for p in self.active if p.id != peer_id]
        if len(self.active) == before:
            return []
        self._new_epoch()
        world = self.world()
        effects: list[Effect] = self._fail_barriers(self.epoch - 1)
        effects += [Push(p.id, world) for p in self.active]
        return effects + self._maybe_advance()

    leave = lost

    def _new_epoch(self) -> None:
        self.epoch += 1
        if self.planner is not None:
            self.costs = self.planner.costs([p.id for p in self.active])

    def _costs_moved(self) -> bool:
        """Whether the figures the world publishes are worth a new epoch: they
        became known, or moved by more than the planner's tolerance."""
        if self.planner is None or not self.active:
            return False
        now = self.planner.costs([p.id for p in self.active])
        return self.planner.costs_moved(self.costs, now)

    def _replan(self, members_changed: bool) -> bool:
        """Put ``active`` in the planner's order; whether it moved."""
        if self.planner is None:
            return False
        order = self.planner.plan([p.id for p in self.active], members_changed)
        if order is None:
            return False
        by_id = {p.id: p for p in self.active}
        self.active = [by_id[pid] for pid in order]
        return True

    def _maybe_advance(self) -> list[Effect]:
        # Members yet to reconnect after a restart are waited for too: they come
        # back (and call) or expire (and are lost) within the rejoin grace.
        active_ids = [p.id for p in self.active]
        if active_ids and not all(pid in self.waiting for pid in active_ids):
            return []
        if not active_ids and not any(pid in self.waiting for pid in self.pending):
            return []
        admitted = list(self.pending.values())
        effects: list[Effect] = []
        self.active.extend(admitted)
        self.pending.clear()
        reordered = self._replan(bool(admitted))
        if admitted or reordered or self._costs_moved():
            self._new_epoch()
            effects += self._fail_barriers(self.epoch - 1)
        world = self.world()
        for p in self.active:
            rid = self.waiting.pop(p.id, None)
            if rid is not None:
                effects.append(Reply(p.id, rid, world))
        for p in admitted:
            if not any(isinstance(e, Reply) and e.peer == p.id for e in effects):
                # Its daemon must learn now that it is a member (others will
                # dial it or wait for its dial), not at its next call.
                self.unannounced.add(p.id)
                effects.append(Push(p.id, world))
        return effects
