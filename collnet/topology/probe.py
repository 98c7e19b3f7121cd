"""When a daemon sends a bandwidth probe on a link, and how large it is.

Bandwidth is measured by the receiver (``ThroughputMeter``) from the large
pieces it gets anyway, so a link that carries collectives needs no probe. A
new link has carried nothing yet: the sender then sends one short burst of
PROBE frames, striped like data, which the receiver's meter times. A burst is

- sent only when the daemon runs no collective (``busy`` is false): it never
  competes with real traffic on that link;
- sized once the link's RTT is known (the first pings are answered): on a
  long path (``long_rtt_s``) the largest timed burst behind an untimed
  warm-up (``warm_bytes``); otherwise twice the link's bandwidth-delay
  product when that is known (enough to fill the pipe for a round trip, so
  the sample measures the link, not the sender's start), clamped to
  ``[min_bytes, max_bytes]``, and ``default_bytes`` before it is;
- warmed up on a long path: new connections spend their first round trips
  in TCP's start, where they carry a fraction of the link (a 16 MiB burst
  over 4 new connections read 178-287 Mbit/s of a 1 Gbit/s, 100 ms path in
  the WAN lab). Reaching the path's rate takes about twice its
  bandwidth-delay product of bytes, so that much goes first, untimed, on
  every connection the timed pieces use: twice the BDP at twice the link's
  estimate (an estimate read too low grows the next warm-up), or at
  ``warm_bps`` before there is one, at most ``max_warm_bytes``;
- rate-limited: at most one per link every ``min_interval_s``, and after the
  first, only when the link has sent no large traffic for ``fresh_s`` (the
  receiver's estimate would otherwise be fresh from real traffic already).

Pure: ``BurstPolicy.burst_bytes`` decides from a ``ProbeState`` and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# The receiver's meter drops samples under 1 MiB (they measure latency).
MIN_BURST_BYTES = 1 << 20
DEFAULT_BURST_BYTES = 4 << 20
MAX_BURST_BYTES = 16 << 20
MAX_WARM_BYTES = 48 << 20
# The rate a warm-up is sized for when the link has no estimate yet.
WARM_BPS = 1e9


@dataclass
class ProbeState:
    """What the prober remembers of one link."""

    # When the last burst went out (None: never).
    burst_s: float | None = None
    # Bytes this end had sent on the link, and when that count last grew by a
    # large transfer (a collective's), as the prober last saw them.
    sent_bytes: int = 0
    traffic_s: float | None = None

    def saw_sent(self, sent_bytes: int, now_s: float, large_bytes: int = MIN_BURST_BYTES) -> None:
        """The link's counter of timed bytes sent now: a jump of ``large_bytes`` or
        more past the highest it read is real traffic the receiver could measure.
        (The counter may dip: untimed payload is subtracted when it is queued,
        before the kernel has taken it, and climbs back as it goes.)"""
        if sent_bytes - self.sent_bytes >= large_bytes:
            self.traffic_s = now_s
        self.sent_bytes = max(self.sent_bytes, sent_bytes)


@dataclass(frozen=True)
class BurstPolicy:
    min_interval_s: float = 60.0
    fresh_s: float = 120.0
    # Shorter bursts on a short path time the first piece's latency more than the
    # link (measured on loopback: 1-2 MiB bursts read 2 Gbit/s where 4 MiB read 20).
    min_bytes: int = DEFAULT_BURST_BYTES
    default_bytes: int = DEFAULT_BURST_BYTES
    max_bytes: int = MAX_BURST_BYTES
    # Paths at least this long get the largest burst (see burst_bytes).
    long_rtt_s: float = 0.005
    warm_bps: float = WARM_BPS
    max_warm_bytes: int = MAX_WARM_BYTES

    def burst_bytes(
        self,
        state: ProbeState,
        now_s: float,
        busy: bool,
        bandwidth_bps: float | None = None,
        rtt_s: float | None = None,
    ) -> int:
        """How many bytes to send as a probe now (0: none)."""
        if busy:
            return 0
        if state.burst_s is not None:
            if now_s - state.burst_s < self.min_interval_s:
                return 0
            if state.traffic_s is not None and now_s - state.traffic_s < self.fresh_s:
                return 0
        if rtt_s is None:
            # The first pings are out: the burst's size depends on their answer.
            return 0 if state.burst_s is None else self.default_bytes
        if rtt_s >= self.long_rtt_s:
            # On a long path a burst spends its first round trips in TCP's slow
            # start; a short one reads the start, not the link (4 MiB at 100 ms read
            # alike on 250 Mbit/s and 1 Gbit/s paths in the WAN lab), and an estimate
            # taken from it sizes the next burst just as short.
            return self.max_bytes
        if bandwidth_bps is None:
            return self.default_bytes
        bdp_bytes = int(bandwidth_bps / 8 * rtt_s)
        return max(self.min_bytes, min(self.max_bytes, 2 * bdp_bytes))

    def warm_bytes(self, bandwidth_bps: float | None, rtt_s: float | None) -> int:
        """Untimed bytes to send ahead of a burst (0 on a short or unknown path)."""
        if rtt_s is None or rtt_s < self.long_rtt_s:
            return 0
        bps = self.warm_bps if bandwidth_bps is None else 2 * bandwidth_bps
        return min(self.max_warm_bytes, int(2 * bps / 8 * rtt_s))
