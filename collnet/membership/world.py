"""The world as every participant sees it: an epoch and an ordered member list.

A ``WorldView`` is immutable; a new epoch is a new object. The ring order is
the order of ``peers``: rank i sends to rank (i + 1) % size. ``costs``, when
the coordinator has link figures, are the epoch's agreed worst RTT and ring
bottleneck: fixed with the epoch, so every rank that decides from them (the
``auto`` algorithm) decides alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from collnet.errors import ProtocolError
from collnet.topology.costmodel import LinkCosts


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A member: its id and the address of its data listener."""

    id: str
    host: str
    port: int

    def to_wire(self) -> list[Any]:
        return [self.id, self.host, self.port]

    @staticmethod
    def from_wire(obj: Any) -> PeerInfo:
        if (
            not isinstance(obj, list)
            or len(obj) != 3
            or not isinstance(obj[0], str)
            or not isinstance(obj[1], str)
            or type(obj[2]) is not int
        ):
            raise ProtocolError(f"bad peer record {obj!r}")
        return PeerInfo(obj[0], obj[1], obj[2])


@dataclass(frozen=True, slots=True)
class WorldView:
    """One epoch of the world: who is active (in ring order) and who waits."""

    epoch: int
    peers: tuple[PeerInfo, ...]
    pending: tuple[str, ...] = ()
    costs: LinkCosts | None = None

    @property
    def size(self) -> int:
        return len(self.peers)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.peers)

    def rank_of(self, peer_id: str) -> int | None:
        for rank, peer in enumerate(self.peers):
            if peer.id == peer_id:
                return rank
        return None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "peers": [p.to_wire() for p in self.peers],
            "pending": list(self.pending),
        }
        if self.costs is not None:
            out["costs"] = self.costs.to_wire()
        return out

    @staticmethod
    def from_wire(obj: Any) -> WorldView:
        if not isinstance(obj, dict) or type(obj.get("epoch")) is not int:
            raise ProtocolError(f"bad world record {obj!r}")
        peers = obj.get("peers", [])
        pending = obj.get("pending", [])
        if not isinstance(peers, list) or not isinstance(pending, list):
            raise ProtocolError("bad world record: peers and pending must be lists")
        if not all(isinstance(p, str) for p in pending):
            raise ProtocolError("bad world record: pending ids must be strings")
        return WorldView(
            int(obj["epoch"]),
            tuple(PeerInfo.from_wire(p) for p in peers),
            tuple(pending),
            LinkCosts.from_wire(obj.get("costs")),
        )
