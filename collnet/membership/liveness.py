"""Failure detection from heartbeats, with a timeout that adapts to round trips.

Each end of a connection pings every ``interval_s`` and answers pings at
once. A pong yields a round-trip sample, smoothed as TCP does (RFC 6298:
``srtt``, ``rttvar``); the peer is declared dead when nothing at all has
arrived for ``timeout_s = clamp(interval_s + 4 * (srtt + 4 * rttvar), floor_s,
ceiling_s)``. Any traffic counts as a sign of life, so a link busy with a
large transfer never times out while its bytes flow.

Pure: callers pass the clock in, so tests drive it without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Liveness:
    interval_s: float = 0.5
    floor_s: float = 2.0
    ceiling_s: float = 10.0
    srtt_s: float | None = None
    rttvar_s: float = 0.0
    last_heard_s: float = 0.0
    _sent: dict[int, float] = field(default_factory=dict)
    _next_seq: int = 0

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and 0 < self.floor_s <= self.ceiling_s):
            raise ValueError("need 0 < interval_s and 0 < floor_s <= ceiling_s")

    @property
    def timeout_s(self) -> float:
        if self.srtt_s is None:
            # No sample yet: a few missed intervals, within the bounds.
            return max(self.floor_s, min(self.ceiling_s, 4 * self.interval_s))
        adaptive = self.interval_s + 4 * (self.srtt_s + 4 * self.rttvar_s)
        return max(self.floor_s, min(self.ceiling_s, adaptive))

    def start(self, now_s: float) -> None:
        self.last_heard_s = now_s

    def ping(self, now_s: float) -> int:
        """A new ping's sequence number; remember when it left."""
        seq = self._next_seq
        self._next_seq += 1
        self._sent[seq] = now_s
        # Unanswered pings older than a timeout will never count: forget them.
        while len(self._sent) > 64:
            self._sent.pop(next(iter(self._sent)))
        return seq

    def heard(self, now_s: float) -> None:
        """Anything arrived from the peer."""
        self.last_heard_s = max(self.last_heard_s, now_s)

    def pong(self, seq: int, now_s: float) -> float | None:
        """The answer to ping ``seq``: update the RTT estimate; the sample."""
        self.heard(now_s)
        sent = self._sent.pop(seq, None)
        if sent is None or now_s < sent:
            return None
        rtt = now_s - sent
        if self.srtt_s is None:
            self.srtt_s, self.rttvar_s = rtt, rtt / 2
        else:
            self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - rtt)
            self.srtt_s = 0.875 * self.srtt_s + 0.125 * rtt
        return rtt

    def expired(self, now_s: float) -> bool:
        return now_s - self.last_heard_s > self.timeout_s

    def silent_s(self, now_s: float) -> float:
        return now_s - self.last_heard_s
