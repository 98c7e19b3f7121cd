"""A link's round-trip time, as the minimum of recent samples.

Samples come from heartbeat pings answered on the data link itself. While a
collective fills the link, a pong queues behind megabytes of data, so a
single sample measures the queue as much as the path; the smallest sample
of a recent window (what BBR calls min_rtt) is the path's own delay, and it
still follows a path that got slower once the window has moved past the
faster samples.

Invariants: at most ``max_samples`` are kept (memory is bounded however fast
pongs come); with no sample inside the window the latest sample stands, so an
estimate once known is never lost to a quiet spell. Pure: callers pass the
clock in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class MinRtt:
    window_s: float = 30.0
    max_samples: int = 256
    _samples: deque[tuple[float, float]] = field(default_factory=deque)
    # The samples that are the smallest of all those after them, oldest
    # first (the same tuples as in ``_samples``): the front is the minimum.
    # Every message a link sends asks for the RTT, so the minimum must not
    # cost a scan of up to ``max_samples``.
    _minima: deque[tuple[float, float]] = field(default_factory=deque)

    def sample(self, rtt_s: float, now_s: float) -> None:
        if rtt_s < 0:
            return
        entry = (now_s, rtt_s)
        self._samples.append(entry)
        minima = self._minima
        while minima and minima[-1][1] >= rtt_s:
            minima.pop()
        minima.append(entry)
        while len(self._samples) > self.max_samples:
            self._drop_oldest()

    def value(self, now_s: float) -> float | None:
        """The smallest sample of the last ``window_s``; else the latest; else None."""
        samples = self._samples
        while len(samples) > 1 and now_s - samples[0][0] > self.window_s:
            self._drop_oldest()
        if not samples:
            return None
        if now_s - samples[0][0] > self.window_s:
            return samples[-1][1]
        return self._minima[0][1]

    def _drop_oldest(self) -> None:
        if self._samples.popleft() is self._minima[0]:
            self._minima.popleft()
