"""The peer's side of membership: the world this daemon agreed to, and its history.

The coordinator's ``CoordinatorState`` decides the world; every daemon holds
its own copy in a ``PeerMembership``, fed with each world the coordinator
sends (a registration answer, a barrier's answer, a push). This machine is
the one place that answers "is this collective still current?":

- worlds only move forward: an older epoch that arrives late (a push
  overtaken by a barrier answer) is ignored;
- a collective runs in the world of the epoch the trainer agreed to at
  ``update_topology``; a request for an older epoch fails at once with
  ``PeerLost`` naming who left, on every survivor alike, so no two peers
  ever run one collective in different worlds;
- a collective or sync set up in one epoch is no longer current once the
  epoch moves, even when the member list looks the same (this very peer
  was dropped while frozen and re-admitted): nobody would fail it, and its
  partners would never send.

``PeerLost`` for "the world moved" is built here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from collnet.errors import InvalidArgument, PeerLost
from collnet.membership.world import WorldView

# Worlds remembered, for naming who left when an old epoch's request arrives.
HISTORY = 64


@dataclass(frozen=True, slots=True)
class WorldChange:
    """What applying a world changed: ``gone`` left the world; ``moved`` is true
    when the epoch advanced (collectives being set up must look again)."""

    world: WorldView
    gone: frozenset[str]
    moved: bool

    def member(self, peer_id: str) -> bool:
        return peer_id in self.world.ids


class PeerMembership:
    """The world as daemon ``me`` holds it; see the module docstring."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.world = WorldView(0, ())
        self._history: dict[int, WorldView] = {}

    @property
    def is_member(self) -> bool:
        return self.me in self.world.ids

    def world_at(self, epoch: int) -> WorldView | None:
        """The world of ``epoch`` if it is still remembered."""
        return self._history.get(epoch)

    def apply(self, world: WorldView) -> WorldChange | None:
        """Adopt ``world`` unless it is older than the one held (``None`` then)."""
        if world.epoch < self.world.epoch:
            return None
        moved = world.epoch > self.world.epoch
        gone = frozenset(self.world.ids) - frozenset(world.ids)
        self.world = world
        self._history[world.epoch] = world
        while len(self._history) > HISTORY:
            del self._history[min(self._history)]
        return WorldChange(world, gone, moved)

    def agreed(self, epoch: int | None) -> tuple[WorldView, int]:
        """The world a collective request for ``epoch`` (``None``: the current one)
        runs in, and this peer's rank there; see the module docstring."""
        world = self.world
        if epoch is None:
            epoch = world.epoch
        if epoch > world.epoch:
            raise InvalidArgument(f"bad epoch {epoch!r} (this daemon is at {world.epoch})")
        if epoch < world.epoch:
            then = self._history.get(epoch)
            gone = sorted(set(then.ids) - set(world.ids)) if then is not None else []
            raise PeerLost(
                f"the world changed since epoch {epoch} (now {world.epoch}; lost {gone}): "
                "call update_topology, then retry",
                peer=gone[0] if gone else None,
                epoch=epoch,
            )
        rank = world.rank_of(self.me)
        if rank is None:
            raise InvalidArgument(
                f"daemon {self.me} is not an active member yet: call update_topology first"
            )
        return world, rank

    def check_current(self, world: WorldView, what: str) -> None:
        """Raise ``PeerLost`` if the world moved on since ``what`` was set up in
        ``world`` (links and barriers take time)."""
        if self.world.epoch == world.epoch:
            return
        gone = sorted(set(world.ids) - set(self.world.ids))
        raise PeerLost(
            f"{what}: the world changed while it was being set up (epoch {world.epoch} "
            f"-> {self.world.epoch}; lost {gone or 'none, but this peer was re-admitted'}): "
            "call update_topology, then retry",
            peer=gone[0] if gone else self.me,
            epoch=world.epoch,
        )

    def check_still_member(self, world: WorldView, what: str) -> None:
        """After a coordinator reconnect: ``what``, set up in ``world``, goes on only
        if the world is the same and this peer is still in it."""
        self.check_current(world, what)
        if not self.is_member:
            raise PeerLost(
                f"daemon {self.me} was removed from the world during {what}: "
                "call update_topology, then retry",
                peer=self.me,
                epoch=world.epoch,
            )
