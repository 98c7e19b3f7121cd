"""The local API's replies that carry more than a flag, typed.

A reply is one msgpack map ``{"id", "ok": True, ...fields}`` or ``{"id",
"ok": False, "error": CollnetError.to_wire()}``; the envelope is the
transport's. These classes are the fields: the daemon builds them and sends
``to_wire()``, the SDK reads them with ``from_wire``, which raises
``ProtocolError`` for a malformed reply (the daemon broke the protocol).
The requests are in ``collnet.wire.localapi``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from collnet.codec.minmax import DEFAULT_BLOCK_SIZE
from collnet.errors import ProtocolError
from collnet.membership.world import WorldView


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"bad {what} reply: not a map")
    return obj


@dataclass(frozen=True, slots=True)
class HelloReply:
    """Who the daemon is, the world it holds, and its codec block size (the SDK's
    error feedback quantizes as the wire does)."""

    peer: str
    world: WorldView
    codec_block_size: int = DEFAULT_BLOCK_SIZE

    def to_wire(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "world": self.world.to_wire(),
            "codec_block_size": self.codec_block_size,
        }

    @staticmethod
    def from_wire(obj: Any) -> HelloReply:
        obj = _map(obj, "hello")
        peer = obj.get("peer")
        # Daemons older than error feedback do not say: theirs is the default.
        block = obj.get("codec_block_size", DEFAULT_BLOCK_SIZE)
        if not isinstance(peer, str) or not _is_int(block) or block < 1:
            raise ProtocolError(f"bad hello reply {obj!r:.200}")
        return HelloReply(peer, WorldView.from_wire(obj.get("world")), block)


@dataclass(frozen=True, slots=True)
class WorldReply:
    """The answer of ``world`` and ``update_topology``."""

    world: WorldView

    def to_wire(self) -> dict[str, Any]:
        return {"world": self.world.to_wire()}

    @staticmethod
    def from_wire(obj: Any) -> WorldReply:
        return WorldReply(WorldView.from_wire(_map(obj, "world").get("world")))


@dataclass(frozen=True, slots=True)
class SyncStateReply:
    """What ``sync_state`` did, and whether every peer now holds the same state."""

    revision: int  # the revision this peer holds now
    fetched: tuple[str, ...]  # tensors overwritten with the reference's bytes
    sources: tuple[str, ...]  # peers they were fetched from
    bytes_fetched: int
    in_parity: bool  # every member reported the same revision and state digest
    state_digest: str  # digest of the whole state (names and tensor digests)
    peers: int  # members that took part

    def to_wire(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "fetched": list(self.fetched),
            "sources": list(self.sources),
            "bytes_fetched": self.bytes_fetched,
            "in_parity": self.in_parity,
            "state_digest": self.state_digest,
            "peers": self.peers,
        }

    @staticmethod
    def from_wire(obj: Any) -> SyncStateReply:
        obj = _map(obj, "sync_state")
        fetched, sources = obj.get("fetched"), obj.get("sources")
        ints = (obj.get("revision"), obj.get("bytes_fetched"), obj.get("peers"))
        if (
            not all(_is_int(v) for v in ints)
            or not isinstance(obj.get("in_parity"), bool)
            or not isinstance(obj.get("state_digest"), str)
            or not isinstance(fetched, list)
            or not isinstance(sources, list)
            or not all(isinstance(s, str) for s in fetched + sources)
        ):
            raise ProtocolError(f"bad sync_state reply {obj!r:.200}")
        return SyncStateReply(
            obj["revision"],
            tuple(fetched),
            tuple(sources),
            obj["bytes_fetched"],
            obj["in_parity"],
            obj["state_digest"],
            obj["peers"],
        )
