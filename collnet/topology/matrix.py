"""The coordinator's table of link estimates: bandwidth and RTT per ordered pair.

Each daemon measures what it can see of its links and reports it
(``collnet.wire.topology.LinkReport``): the bandwidth of the bytes it
*receives* from a peer (``ThroughputMeter``), so a report from ``dst`` about
``src`` fills the directed entry ``(src, dst)``, and the round-trip time,
which is the same either way, filed under ``(reporter, peer)`` and read back
from either direction. Links may be asymmetric, which is why bandwidth is
kept per direction.

Invariants:

- only pairs of distinct members are held: ``report`` drops pairs naming a
  non-member, and ``retain`` evicts every entry of a peer that left, so the
  table never outgrows ``n * (n - 1)`` entries of the current world;
- each figure carries the time it was measured (the reporter states its
  age), so ``age_s`` says how stale an estimate is, not when it was last
  repeated;
- ``bandwidth`` and ``rtt`` return ``None`` for a pair with no estimate:
  unknown is never reported as fast;
- ``from_wire`` validates everything it is given (``ProtocolError``).

Pure: callers pass the clock in. Bandwidth is in bits per second.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final

from collnet.errors import ProtocolError
from collnet.membership.bounds import MAX_WORLD_PEERS, valid_peer_id

# Beyond these a figure is not a measurement of a real link.
MAX_BANDWIDTH_BPS: Final = 1e13
MAX_RTT_S: Final = 600.0
MAX_AGE_S: Final = 1e7


@dataclass(frozen=True, slots=True)
class LinkSample:
    """What one daemon measured about its link with ``peer``: the bandwidth of
    the bytes it received from ``peer`` (measured ``bandwidth_age_s`` ago) and
    the round-trip time. ``None``: not measured yet."""

    peer: str
    bandwidth_bps: float | None
    bandwidth_age_s: float
    rtt_s: float | None


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """The estimates of one directed pair and when each was measured."""

    bandwidth_bps: float | None = None
    bandwidth_at_s: float = 0.0
    rtt_s: float | None = None
    rtt_at_s: float = 0.0


def figure(value: Any, what: str, limit: float) -> float | None:
    """A measured figure from the wire: None, or a finite number in [0, limit]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{what} must be a number or nil, got {value!r:.40}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= limit):
        raise ProtocolError(f"{what} out of range: {number!r}")
    return number


def peer_id(value: Any, what: str) -> str:
    if not valid_peer_id(value):
        raise ProtocolError(f"{what} is not a peer id: {value!r:.80}")
    assert isinstance(value, str)
    return value


class LinkMatrix:
    """See the module docstring."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], LinkEstimate] = {}

    def __len__(self) -> int:
        return len(self._links)

    def report(
        self, reporter: str, samples: Iterable[LinkSample], now_s: float, members: Collection[str]
    ) -> None:
        """``reporter``'s measurements; pairs naming a non-member are ignored."""
        if reporter not in members:
            return
        for s in samples:
            if s.peer == reporter or s.peer not in members:
                continue
            if s.bandwidth_bps is not None:
                self._set(
                    (s.peer, reporter), bandwidth=(s.bandwidth_bps, now_s - s.bandwidth_age_s)
                )
            if s.rtt_s is not None:
                self._set((reporter, s.peer), rtt=(s.rtt_s, now_s))

    def _set(
        self,
        pair: tuple[str, str],
        bandwidth: tuple[float, float] | None = None,
        rtt: tuple[float, float] | None = None,
    ) -> None:
        old = self._links.get(pair, LinkEstimate())
        bw, bw_at = bandwidth if bandwidth is not None else (old.bandwidth_bps, old.bandwidth_at_s)
        rt, rt_at = rtt if rtt is not None else (old.rtt_s, old.rtt_at_s)
        self._links[pair] = LinkEstimate(bw, bw_at, rt, rt_at)

    def retain(self, members: Collection[str]) -> None:
        """Evict every entry that names a peer outside ``members``."""
        for pair in [p for p in self._links if p[0] not in members or p[1] not in members]:
            del self._links[pair]

    def bandwidth(self, src: str, dst: str) -> float | None:
        """Estimated bandwidth from ``src`` to ``dst`` in bits/s, None if unknown."""
        entry = self._links.get((src, dst))
        return None if entry is None else entry.bandwidth_bps

    def rtt(self, src: str, dst: str) -> float | None:
        """Estimated round-trip time between ``src`` and ``dst``, None if unknown.
        Measured by either end: the fresher of the two."""
        ours, theirs = self._links.get((src, dst)), self._links.get((dst, src))
        known = [e for e in (ours, theirs) if e is not None and e.rtt_s is not None]
        return max(known, key=lambda e: e.rtt_at_s).rtt_s if known else None

    def estimate(self, src: str, dst: str) -> LinkEstimate | None:
        return self._links.get((src, dst))

    def pairs(self) -> list[tuple[str, str]]:
        return sorted(self._links)

    # -- wire: [{"src", "dst", "bandwidth_bps", "bandwidth_age_s", "rtt_s", "rtt_age_s"}]
    def to_wire(self, now_s: float) -> list[dict[str, Any]]:
        rows = []
        for (src, dst), e in sorted(self._links.items()):
            rows.append(
                {
                    "src": src,
                    "dst": dst,
                    "bandwidth_bps": e.bandwidth_bps,
                    "bandwidth_age_s": _age(e.bandwidth_bps, e.bandwidth_at_s, now_s),
                    "rtt_s": e.rtt_s,
                    "rtt_age_s": _age(e.rtt_s, e.rtt_at_s, now_s),
                }
            )
        return rows

    @staticmethod
    def from_wire(obj: Any, now_s: float, what: str = "links") -> LinkMatrix:
        max_rows = MAX_WORLD_PEERS * (MAX_WORLD_PEERS - 1)
        if not isinstance(obj, list) or len(obj) > max_rows:
            raise ProtocolError(f"{what} must be a list of at most {max_rows} entries")
        matrix = LinkMatrix()
        for row in obj:
            if not isinstance(row, dict):
                raise ProtocolError(f"{what}: an entry must be a map, got {row!r:.40}")
            src, dst = (
                peer_id(row.get("src"), f"{what}: src"),
                peer_id(row.get("dst"), f"{what}: dst"),
            )
            if src == dst or (src, dst) in matrix._links:
                raise ProtocolError(f"{what}: entry {src}->{dst} repeated or to itself")
            bw = figure(row.get("bandwidth_bps"), f"{what}: bandwidth_bps", MAX_BANDWIDTH_BPS)
            rt = figure(row.get("rtt_s"), f"{what}: rtt_s", MAX_RTT_S)
            bw_age = figure(row.get("bandwidth_age_s"), f"{what}: bandwidth_age_s", MAX_AGE_S)
            rt_age = figure(row.get("rtt_age_s"), f"{what}: rtt_age_s", MAX_AGE_S)
            matrix._links[(src, dst)] = LinkEstimate(
                bw, now_s - (bw_age or 0.0), rt, now_s - (rt_age or 0.0)
            )
        return matrix


def _age(value: float | None, at_s: float, now_s: float) -> float | None:
    return None if value is None else round(max(0.0, now_s - at_s), 3)
