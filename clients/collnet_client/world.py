"""The world as this trainer sees it, and the epoch it agreed to.

The agreed epoch is set by ``update_topology`` (and at connect), never by a
mere look at the world. Collectives run in it, so a world that shrank under
the trainer fails them (``PeerLost``) instead of silently moving some peers
to a new epoch and not others. Default tags count from 1 in every epoch, so
the members, joiners included, agree on them without passing tags.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from collnet.membership.world import WorldView
from collnet.wire.localapi import GetWorld, UpdateTopology
from collnet.wire.localreplies import WorldReply
from collnet_client.transport import Transport


@dataclass(frozen=True)
class World:
    """The world as the daemon last saw it."""

    epoch: int
    peers: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.peers)

    @staticmethod
    def of(view: WorldView) -> World:
        return World(view.epoch, tuple(p.id for p in view.peers), view.pending)

    @staticmethod
    def from_wire(obj: dict[str, Any]) -> World:
        return World.of(WorldView.from_wire(obj))


class Agreement:
    """What this trainer agreed to with the others: see the module docstring."""

    def __init__(self, transport: Transport, world: World, local_size: int) -> None:
        self._transport = transport
        self._local_size = local_size
        self.world = world
        self.epoch = world.epoch
        self._tags = itertools.count(1)

    def look(self) -> World:
        """The world the daemon sees now (it asks the coordinator); agrees to nothing."""
        return World.of(WorldReply.from_wire(self._transport.call(GetWorld())).world)

    def update_topology(self, timeout_s: float | None = None) -> World:
        """The barrier of every active member; the world it agreed on."""
        request = UpdateTopology(local_size=self._local_size)
        reply = WorldReply.from_wire(self._transport.call(request, timeout_s))
        self.world = World.of(reply.world)
        if self.world.epoch != self.epoch:
            self._tags = itertools.count(1)
        self.epoch = self.world.epoch
        return self.world

    def next_tag(self) -> int:
        """The default tag of the next collective in this epoch."""
        return next(self._tags)
