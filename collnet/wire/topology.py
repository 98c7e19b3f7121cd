"""Messages of link probing and reachability, one typed home for each.

On the control connection (daemon -> coordinator, see docs/protocol.md):

- ``LinkReport``, request ``{"t": "links", "id", "links": [[peer,
  bandwidth_bps, bandwidth_age_s, rtt_s], ...]}``: what this daemon measured
  of its link with each peer (bandwidth of what it received from ``peer``,
  in bits/s, measured ``bandwidth_age_s`` ago; RTT in seconds; nil: not
  measured). At most ``MAX_REPORT_LINKS`` entries, each peer once.
- ``LinkAck``, its answer ``{"reachable": true | false | nil, "error"}``: the
  coordinator's verdict on this daemon's advertised data port (nil: not
  checked yet).

In the coordinator's status (``collnet status --json``): ``links``, the
``LinkMatrix`` rows, and ``reachability``, one ``{"peer", "address",
"reachable", "error"}`` per registered peer that was checked.

On a data link: PROBE frames, a bandwidth probe's pieces, meta ``[seq,
piece, pieces, warm]`` and a payload of at most ``MAX_PROBE_PIECE_BYTES`` the
receiver discards, timing those from piece ``warm`` on (the first ``warm``
take the connections through TCP's start; a three-element meta has none).

Every parser here validates all it reads and raises ``ProtocolError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Final

from collnet.errors import ProtocolError
from collnet.membership.bounds import MAX_WORLD_PEERS
from collnet.topology.matrix import (
    MAX_AGE_S,
    MAX_BANDWIDTH_BPS,
    MAX_RTT_S,
    LinkMatrix,
    LinkSample,
    figure,
    peer_id,
)

MAX_REPORT_LINKS: Final = MAX_WORLD_PEERS
MAX_PROBE_PIECE_BYTES: Final = 4 << 20
MAX_PROBE_PIECES: Final = 64
MAX_ERROR_CHARS: Final = 300


def _no_payload(payload: bytes | memoryview, what: str) -> None:
    if len(payload):
        raise ProtocolError(f"{what} carries no payload, got {len(payload)} bytes")


@dataclass(frozen=True, slots=True)
class LinkReport:
    """A daemon's link estimates (see the module docstring)."""

    T: ClassVar[str] = "links"
    links: tuple[LinkSample, ...]

    @property
    def payload(self) -> bytes:
        return b""

    def to_wire(self) -> dict[str, Any]:
        rows = [[s.peer, s.bandwidth_bps, s.bandwidth_age_s, s.rtt_s] for s in self.links]
        return {"links": rows}

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: bytes | memoryview = b"") -> LinkReport:
        _no_payload(payload, "links")
        rows = msg.get("links")
        if not isinstance(rows, list) or len(rows) > MAX_REPORT_LINKS:
            raise ProtocolError(f"links: 'links' must be a list of at most {MAX_REPORT_LINKS}")
        samples: list[LinkSample] = []
        seen: set[str] = set()
        for row in rows:
            if not isinstance(row, list) or len(row) != 4:
                raise ProtocolError(
                    f"links: an entry must be [peer, bps, age, rtt], got {row!r:.60}"
                )
            peer = peer_id(row[0], "links: peer")
            if peer in seen:
                raise ProtocolError(f"links: peer {peer!r} reported twice")
            seen.add(peer)
            bw = figure(row[1], "links: bandwidth_bps", MAX_BANDWIDTH_BPS)
            age = figure(row[2], "links: bandwidth_age_s", MAX_AGE_S)
            rtt = figure(row[3], "links: rtt_s", MAX_RTT_S)
            samples.append(LinkSample(peer, bw, age or 0.0, rtt))
        return LinkReport(tuple(samples))


def _reachable(value: Any, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(f"{what}: 'reachable' must be true, false or nil, got {value!r:.40}")
    return value


def _error(value: Any, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_ERROR_CHARS):
        raise ProtocolError(f"{what}: 'error' must be a short string or nil")
    return value


@dataclass(frozen=True, slots=True)
class LinkAck:
    """The answer to ``links``: the verdict on the reporter's own data port."""

    reachable: bool | None = None
    error: str | None = None

    @property
    def payload(self) -> bytes:
        return b""

    def to_wire(self) -> dict[str, Any]:
        return {"reachable": self.reachable, "error": self.error}

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: bytes | memoryview = b"") -> LinkAck:
        _no_payload(payload, "a links answer")
        what = "links answer"
        return LinkAck(_reachable(msg.get("reachable"), what), _error(msg.get("error"), what))


@dataclass(frozen=True, slots=True)
class Reachability:
    """Whether the coordinator could reach ``peer``'s advertised data ``address``."""

    peer: str
    address: str
    reachable: bool | None
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"peer": self.peer, "address": self.address, "reachable": self.reachable,
                "error": self.error}  # fmt: skip

    @staticmethod
    def from_wire(obj: Any, what: str = "reachability") -> Reachability:
        if not isinstance(obj, dict):
            raise ProtocolError(f"{what}: an entry must be a map, got {obj!r:.40}")
        address = obj.get("address")
        if not isinstance(address, str) or len(address) > 300:
            raise ProtocolError(f"{what}: 'address' must be a string")
        return Reachability(
            peer_id(obj.get("peer"), f"{what}: peer"),
            address,
            _reachable(obj.get("reachable"), what),
            _error(obj.get("error"), what),
        )


@dataclass(frozen=True, slots=True)
class TopologyStatus:
    """The link matrix and reachability verdicts, as ``collnet status`` shows them;
    their keys (``links``, ``reachability``) sit at the top level of the status."""

    links: LinkMatrix
    reachability: tuple[Reachability, ...]
    now_s: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "links": self.links.to_wire(self.now_s),
            "reachability": [r.to_wire() for r in self.reachability],
        }

    @staticmethod
    def from_wire(status: dict[str, Any], now_s: float = 0.0) -> TopologyStatus | None:
        """From a status map; None from one without these keys (an older coordinator)."""
        if "links" not in status and "reachability" not in status:
            return None
        rows = status.get("reachability", [])
        if not isinstance(rows, list) or len(rows) > MAX_WORLD_PEERS:
            raise ProtocolError("status: 'reachability' must be a list")
        return TopologyStatus(
            LinkMatrix.from_wire(status.get("links", []), now_s),
            tuple(Reachability.from_wire(r) for r in rows),
            now_s,
        )


@dataclass(frozen=True, slots=True)
class ProbePiece:
    """Piece ``piece`` of ``pieces`` of bandwidth probe ``seq``; the first ``warm``
    pieces only warm the connections up and are not timed."""

    seq: int
    piece: int
    pieces: int
    warm: int = 0

    @property
    def timed(self) -> bool:
        return self.piece >= self.warm

    def to_wire(self) -> list[int]:
        return [self.seq, self.piece, self.pieces, self.warm]

    @staticmethod
    def from_wire(meta: Any, payload_len: int) -> ProbePiece:
        """``[seq, piece, pieces(, warm)]``: a daemon without warm-up sends three."""
        if (
            type(meta) is not list
            or len(meta) not in (3, 4)
            or not all(type(v) is int and v >= 0 for v in meta)
            or not meta[1] < meta[2] <= MAX_PROBE_PIECES
            or (len(meta) == 4 and not meta[3] < meta[2])
        ):
            raise ProtocolError(f"bad PROBE metadata {meta!r:.80}")
        if payload_len > MAX_PROBE_PIECE_BYTES:
            raise ProtocolError(f"PROBE piece of {payload_len} bytes, over {MAX_PROBE_PIECE_BYTES}")
        return ProbePiece(*meta)
