"""Measured bandwidth of a link, from the large messages it carries anyway.

No probe traffic: the meter watches pieces of collectives arrive. A *busy
window* opens when a large piece starts arriving while none is in flight and
closes when the last one in flight completes; long windows are cut every
``sample_period_s`` so a transfer of many gigabytes still yields samples while
it runs. One sample is the bytes that arrived in a window over its duration:
what the link achieved while it was busy (idle time between collectives does
not dilute it). Bytes are read from the link's received-byte counter rather
than summed from piece sizes, so a piece straddling a cut counts in each
window with what arrived there. The counter is read when a piece's header has
been parsed, by which time the same read may have brought part of its
payload, so a window that was never cut also knows the sizes of the pieces
it saw whole and counts at least those: a lone 1 MiB message read as a few
bytes short of it. A window that closes under ``min_sample_bytes`` stays
pending for ``join_gap_s``: a piece beginning by then continues it (the
pieces of one message, striped over K connections, may arrive one after the
other, each alone too small to count). Samples smaller than
``min_sample_bytes`` say more about latency than bandwidth and are dropped.
The estimate is the ratio of exponentially decayed sums of the samples'
bytes and of their seconds, so a sample weighs as much as the time it
spans: a window of a fraction of a millisecond that drains what the kernel
queued while this loop was busy reads many times the link (one read 23
Gbit/s on a 1 Gbit/s link), and must not move the estimate as a second of
traffic does.

A link's share is not the link: while a collective runs whose schedule
shares a node's link among several of its links (``share``; the direct and
star all-reduces: ``Schedule.shares_node_link``), each of them carries a
fraction of what its path holds, so windows that saw any of that time are
dropped, not sampled.

Pieces striped over K connections overlap in time, which is why the window
spans all of them rather than timing each piece: one piece alone gets only
its connection's share of the link.

Pure: callers pass the clock in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ThroughputMeter:
    min_sample_bytes: int = 1 << 20
    sample_period_s: float = 1.0
    join_gap_s: float = 0.005
    # Weight of a new sample against the decayed sums: a few windows (of
    # similar lengths) follow a changed link.
    alpha: float = 0.3
    bytes_per_s: float | None = None
    samples: int = 0
    # When the latest sample was taken (what a report's age is measured from).
    sampled_s: float | None = None
    _in_flight: int = 0
    _window_start_s: float = 0.0
    _window_start_bytes: int = 0
    # Payload of the pieces ended in the current window, and whether it was cut
    # (a cut window's pieces began in the one before).
    _window_piece_bytes: int = 0
    _window_cut: bool = False
    # A closed window too small to sample: when it closed (None: none pending).
    _pending_end_s: float | None = None
    # Collectives now sharing the node's link with this one (see the docstring),
    # and whether the current window saw any of that.
    _shared: int = 0
    _tainted: bool = False
    # The samples' bytes and seconds, each decayed by 1 - alpha per sample.
    _bytes_sum: float = 0.0
    _seconds_sum: float = 0.0

    def share(self) -> None:
        """A collective that shares this node's link among several links began."""
        self._shared += 1
        self._tainted = True

    def unshare(self) -> None:
        """One such collective ended."""
        self._shared = max(0, self._shared - 1)

    def begin(self, now_s: float, received_bytes: Callable[[], int]) -> None:
        """A large piece started arriving; ``received_bytes()`` reads the link's byte counter.

        The counter is read only where a window opens or closes: summing it over
        K connections for every piece would cost more than everything else here.
        """
        if self._in_flight == 0:
            pending = self._pending_end_s
            self._pending_end_s = None
            if pending is None or now_s - pending > self.join_gap_s:
                self._window_start_s = now_s
                self._window_start_bytes = received_bytes()
                self._window_piece_bytes = 0
                self._window_cut = False
                self._tainted = self._shared > 0
        self._in_flight += 1

    def end(self, now_s: float, received_bytes: Callable[[], int], piece_bytes: int = 0) -> None:
        """One of the pieces in flight (of ``piece_bytes`` payload) finished arriving."""
        if self._in_flight == 0:
            return  # an end without a begin (the meter was attached mid-piece)
        self._in_flight -= 1
        self._window_piece_bytes += piece_bytes
        elapsed_s = now_s - self._window_start_s
        if self._in_flight == 0 or elapsed_s >= self.sample_period_s:
            # The byte counter, not the pieces' sizes: pieces straddling a cut
            # count only the bytes that arrived inside the window.
            received = received_bytes()
            nbytes = received - self._window_start_bytes
            if not self._window_cut:
                nbytes = max(nbytes, self._window_piece_bytes)
            if self._in_flight == 0 and nbytes < self.min_sample_bytes:
                self._pending_end_s = now_s  # the next piece may continue it
                return
            if not self._tainted:
                self._sample(nbytes, elapsed_s, now_s)
            self._window_start_s = now_s
            self._window_start_bytes = received
            self._window_piece_bytes = 0
            self._window_cut = self._in_flight > 0
            self._tainted = self._shared > 0

    def add(self, nbytes: int, elapsed_s: float, now_s: float) -> None:
        """A sample timed elsewhere (a long probe's, ``BurstTimer``)."""
        self._sample(nbytes, elapsed_s, now_s)

    def _sample(self, nbytes: int, elapsed_s: float, now_s: float) -> None:
        if nbytes < self.min_sample_bytes or elapsed_s <= 0:
            return
        keep = 1.0 - self.alpha
        self._bytes_sum = keep * self._bytes_sum + nbytes
        self._seconds_sum = keep * self._seconds_sum + elapsed_s
        self.bytes_per_s = self._bytes_sum / self._seconds_sum
        self.samples += 1
        self.sampled_s = now_s


# A burst cut into at least this many timed pieces is timed by ``BurstTimer``.
TAIL_TIMED_MIN_PIECES = 16
# The share of a burst's timed pieces whose arrival ends its sample.
BURST_SHARE = 0.9


@dataclass
class BurstTimer:
    """Times a long path's probe burst, blind to its last pieces.

    A burst timed until its last piece lands reads whatever one of its
    connections did last: TCP BBR holds each busy connection to four packets
    for 200 ms plus a round trip every ten seconds (PROBE_RTT), and the piece
    such a connection holds lands about 1.5 round trips late however small it
    is; a 16 MiB burst at 1 Gbit/s and 100 ms then read about 435 Mbit/s. The
    sender cuts a long probe into many pieces that go to whichever connection
    has room (``collnet.transport.pieceq``), so a stalled connection holds one
    or two of them; this times the link from the first timed piece to land to
    the one that brings the count to ``share`` of the burst, by the link's
    byte counter: whatever arrived in between (the warm-up's last bytes on a
    connection still finishing it, parts of pieces in flight) is what the link
    carried in that time.
    """

    share: float = BURST_SHARE
    seq: int | None = None
    _pieces = 0
    _landed = 0
    _first_s = 0.0
    _first_bytes = 0

    def landed(
        self, seq: int, pieces: int, now_s: float, received_bytes: int
    ) -> tuple[int, float] | None:
        """A timed piece of burst ``seq`` (of ``pieces`` timed pieces) landed, the
        link's byte counter reading ``received_bytes``: the sample ``(bytes,
        seconds)`` once, at the share's piece."""
        if seq != self.seq:
            self.seq, self._pieces, self._landed = seq, pieces, 0
        self._landed += 1
        if self._landed == 1:
            self._first_s, self._first_bytes = now_s, received_bytes
            return None
        if self._landed != max(2, math.ceil(self.share * self._pieces)):
            return None
        return received_bytes - self._first_bytes, now_s - self._first_s
