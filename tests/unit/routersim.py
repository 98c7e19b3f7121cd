"""RouterSim: N collective engines (``collnet.engine.Router``) wired by a fake network.

Each peer has a ``Router``; the sim performs their actions the way the
daemon's executor does, without sockets or futures:

- ``Transmit`` is cut into striped pieces (as ``PeerLink.send_data`` does,
  ``[*head, offset, total]``), and every piece travels in two stages like on
  a real connection: *announce* (``data_sink`` hands out a buffer) and
  *land* (bytes copied in, then ``on_data``). A seeded RNG picks the next
  stage of any piece in flight, so pieces of one message, of one link and of
  different collectives interleave in any order.
- ``SendAbort`` becomes an ABORT delivered (in order with nothing) to that
  peer; ``Finished``/``Failed`` are recorded per peer and key; ``Settled``
  is recorded too.

Payload bytes are read from the sender's view when a piece lands, not when it
was sent, so a schedule that overwrites bytes it has sent corrupts results
and the tests see it. Faults: ``kill`` (the peer stops; its links break on
every survivor), ``cut`` (one link breaks, seen by its two ends), and
anything a test does by calling a router directly (a coordinator verdict,
a deadline, a cancel).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from collnet.algo import make_all_reduce
from collnet.algo.actions import Schedule
from collnet.codec.base import Codec
from collnet.engine import (
    AbortedEarly,
    EngineAction,
    Failed,
    Finished,
    Router,
    Run,
    SendAbort,
    Settled,
    Transmit,
)
from collnet.errors import CollnetError, ProtocolError
from collnet.membership.world import PeerInfo, WorldView
from collnet.wire.datalink import AbortMessage, DataPiece, Key, parse_data

Outcome = Finished | Failed


@dataclass
class Piece:
    src: str
    dst: str
    meta: list[Any]
    payload: memoryview
    target: memoryview | None = None
    announced: bool = False


def world_of(n: int, epoch: int = 1) -> WorldView:
    return WorldView(epoch, tuple(PeerInfo(f"p{r}", "127.0.0.1", 1000 + r) for r in range(n)))


@dataclass
class RouterSim:
    """Routes every peer's engine actions through a fake network; see module docstring."""

    world: WorldView
    rng: random.Random
    stripes: int = 3
    max_early_bytes: int = 1 << 30
    max_early_bytes_per_peer: int | None = None
    routers: dict[str, Router] = field(default_factory=dict)
    in_flight: list[Piece] = field(default_factory=list)
    outcomes: dict[tuple[str, Key], Outcome] = field(default_factory=dict)
    settled: list[tuple[str, Key]] = field(default_factory=list)
    early_news: list[tuple[str, Key]] = field(default_factory=list)
    aborts_sent: list[tuple[str, str, AbortMessage]] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    cut_links: set[frozenset[str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        for peer in self.world.ids:
            self.routers[peer] = Router(peer, self.max_early_bytes, self.max_early_bytes_per_peer)

    # -- driving -----------------------------------------------------------
    def start(
        self,
        peer: str,
        tag: int | str,
        buf: np.ndarray,
        op: str = "sum",
        algo: str = "ring",
        codec: Codec | None = None,
        chunk_bytes: int = 256,
        digest: int = 7,
        world: WorldView | None = None,
    ) -> Run:
        world = world or self.world
        rank = world.rank_of(peer)
        assert rank is not None
        schedule = make_all_reduce(algo, rank, world.size, buf, op, codec, chunk_bytes)
        return self.start_schedule(peer, tag, schedule, digest, world)

    def start_schedule(
        self,
        peer: str,
        tag: int | str,
        schedule: Schedule,
        digest: int = 7,
        world: WorldView | None = None,
    ) -> Run:
        """Start any schedule (built for ``peer``'s rank) as collective ``tag``."""
        world = world or self.world
        rank = world.rank_of(peer)
        assert rank is not None and schedule.rank == rank
        run = Run((world.epoch, tag), world, rank, schedule, digest)
        self.perform(peer, self.routers[peer].start(run))
        return run

    def perform(self, peer: str, actions: list[EngineAction]) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                dst = self._world_peer(action.key, action.to)
                self._transmit(peer, dst, action.head, action.payload)
            elif isinstance(action, SendAbort):
                self.aborts_sent.append((peer, action.peer, action.message))
                if self._connected(peer, action.peer):
                    self.perform(
                        action.peer, self.routers[action.peer].on_abort(peer, action.message)
                    )
            elif isinstance(action, Finished | Failed):
                assert (peer, action.key) not in self.outcomes, f"{peer} ended {action.key} twice"
                self.outcomes[(peer, action.key)] = action
            elif isinstance(action, Settled):
                self.settled.append((peer, action.key))
            elif isinstance(action, AbortedEarly):
                self.early_news.append((peer, action.key))

    def _world_peer(self, key: Key, rank: int) -> str:
        assert key[0] == self.world.epoch
        return self.world.peers[rank].id

    def _connected(self, a: str, b: str) -> bool:
        return a not in self.dead and b not in self.dead and frozenset((a, b)) not in self.cut_links

    def _transmit(self, src: str, dst: str, head: list[Any], payload: memoryview) -> None:
        if not self._connected(src, dst):
            return
        total = len(payload)
        pieces = max(1, min(self.stripes, total))
        step = -(-total // pieces) if total else 0
        offset = 0
        while True:
            end = min(total, offset + step)
            self.in_flight.append(Piece(src, dst, [*head, offset, total], payload[offset:end]))
            offset = end
            if offset >= total:
                break

    def step(self) -> bool:
        """Advance one random piece by one stage; False when nothing is in flight."""
        if not self.in_flight:
            return False
        i = self.rng.randrange(len(self.in_flight))
        piece = self.in_flight[i]
        router = self.routers[piece.dst]
        parsed = parse_data(piece.meta)
        assert isinstance(parsed, DataPiece)
        if not piece.announced:
            piece.announced = True
            try:
                piece.target, actions = router.data_sink(piece.src, parsed, len(piece.payload))
            except ProtocolError:
                self.cut(piece.src, piece.dst, "protocol error")
                return True
            self.perform(piece.dst, actions)
            return True
        self.in_flight[i] = self.in_flight[-1]
        self.in_flight.pop()
        assert piece.target is not None and len(piece.target) == len(piece.payload)
        piece.target[:] = piece.payload
        self.perform(piece.dst, router.on_data(piece.src, parsed, piece.target))
        return True

    def run(self, max_steps: int | None = None) -> int:
        steps = 0
        while (max_steps is None or steps < max_steps) and self.step():
            steps += 1
        return steps

    # -- faults ------------------------------------------------------------
    def kill(self, peer: str) -> None:
        """``peer`` dies: every survivor's link to it breaks; nothing more moves."""
        self.dead.add(peer)
        self.in_flight = [p for p in self.in_flight if peer not in (p.src, p.dst)]
        for other in self.world.ids:
            if other not in self.dead:
                self.perform(other, self.routers[other].link_lost(peer, f"{peer} killed"))

    def cut(self, a: str, b: str, reason: str = "cut") -> None:
        """The link between ``a`` and ``b`` breaks; both ends see it."""
        self.cut_links.add(frozenset((a, b)))
        self.in_flight = [p for p in self.in_flight if {p.src, p.dst} != {a, b}]
        for me, other in ((a, b), (b, a)):
            if me not in self.dead:
                self.perform(me, self.routers[me].link_lost(other, reason))

    # -- reading outcomes --------------------------------------------------
    def outcome(self, peer: str, key: Key) -> Outcome | None:
        return self.outcomes.get((peer, key))

    def error(self, peer: str, key: Key) -> CollnetError:
        outcome = self.outcomes.get((peer, key))
        assert isinstance(outcome, Failed), f"{peer}: {key} ended with {outcome}"
        return outcome.error
