"""A link to one peer: K parallel TCP connections used as one striped pipe.

Long fat WAN pipes are filled by several TCP streams. Every piece of a
message is written by the receiver straight to its offset in the
destination buffer, so the pieces may arrive in any order, over any
connection, and reassembly costs no copy. On a short path (RTT known and
under ``LONG_PATH_RTT_S``) a large message is cut into at most K pieces of
at least 2 MiB, one per connection in turn: there the CPU per frame is what
counts. On a long (or not yet measured) path the pieces are small and go to
whichever connection has handed all it holds to the kernel
(``collnet.transport.pieceq``), so one connection that slows down does not
hold up the rest of the message; a message sent while other links share this
node's own (a direct all-reduce's, ``fan``) goes over only its share of them
(``collnet.topology.striping.connections_sharing``). The link fails as a
whole: losing any of its connections loses the link, and the router learns it
once, as a typed ``PeerLost``.

A peer that stops reading is treated as a failed one: at every heartbeat the
link asks each connection how long its queued bytes have gone without any
reaching the kernel (``FrameConnection.stalled_s``), and past the failure
detector's ceiling the link fails with ``PeerLost`` naming the peer, so its
collectives fail and a ``drain`` waiting on it ends. The check runs per
heartbeat, never per piece sent.

The link measures its own path as it goes: the round-trip time of its
heartbeats (``rtt``, the minimum of recent samples) and the bandwidth of what
it receives (``rx_meter``). A bandwidth probe (``send_probe``, decided by
``collnet.topology.probe``) is a burst of PROBE pieces striped like data; the
receiving link times it with the same meter and discards the bytes into one
bounded scratch buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from collnet.errors import CollnetError, PeerLost, ProtocolError
from collnet.membership.liveness import Liveness
from collnet.topology.probe import MIN_BURST_BYTES
from collnet.topology.rtt import MinRtt
from collnet.topology.striping import connections_sharing
from collnet.topology.throughput import TAIL_TIMED_MIN_PIECES, BurstTimer, ThroughputMeter
from collnet.transport.connection import FrameConnection
from collnet.transport.heartbeat import Heartbeat
from collnet.transport.loglimit import REMOTE, host_of
from collnet.transport.pieceq import PieceQueue, pieces_for
from collnet.wire import Frame, FrameKind, Header
from collnet.wire.topology import MAX_PROBE_PIECE_BYTES, MAX_PROBE_PIECES, ProbePiece

log = logging.getLogger(__name__)

# On a short path (RTT known and under LONG_PATH_RTT_S: loopback, a LAN) a cold
# connection costs next to nothing and the CPU per frame is what counts: pieces
# keep at least this much there (4 peers on loopback, K = 4, 64 MiB: 0.22 s with
# 64 KiB pieces against 0.17 s with these).
SHORT_PATH_MIN_PIECE_BYTES = 2 << 20
LONG_PATH_RTT_S = 0.005
# Pieces at least this large feed the bandwidth meter; smaller ones measure latency.
METERED_PIECE_BYTES = 64 << 10
# A long path's probe: timed pieces of at least this much, this many at most
# (16 MiB: 32 of 512 KiB, so a stalled connection holds about 4 % of the burst).
TAILED_PROBE_MIN_PIECE_BYTES = 512 << 10
TAILED_PROBE_PIECES = 32


class LinkRouter(Protocol):
    """Where a link delivers what arrives (implemented by the daemon)."""

    def data_sink(self, peer: str, meta: Any, nbytes: int) -> memoryview | None: ...

    def on_data(self, peer: str, meta: Any, payload: memoryview) -> None: ...

    def on_control(self, peer: str, frame: Frame) -> None: ...

    def on_link_lost(self, peer: str, exc: CollnetError) -> None: ...


class PeerLink:
    """K connections to ``peer``; see the module docstring."""

    def __init__(
        self,
        peer: str,
        connections: int,
        router: LinkRouter,
        liveness: Liveness | None = None,
    ) -> None:
        self.peer = peer
        self.k = connections
        self.router = router
        self.conns: list[FrameConnection | None] = [None] * connections
        self.ready = asyncio.Event()
        self.error: CollnetError | None = None
        self._next = 0
        # The path's round-trip time, from this link's own heartbeats (topology.rtt).
        self.rtt = MinRtt()
        # What the kernel timed while the dialler's first connection was made
        # (its K was sized from it: collnet.transport.mesh), if this side dialled.
        self.dial_rtt_s: float | None = None
        self.heartbeat = Heartbeat(
            self._beat, self.bytes_received, self._silent, liveness or Liveness(), self.rtt.sample
        )
        self.rx_meter = ThroughputMeter()
        # Payload sent while links shared a node's link (``send_data``'s
        # ``timed`` false): the far end's meter does not time it, so it
        # refreshes no estimate.
        self.shared_bytes_sent = 0
        self._burst = BurstTimer()
        # Where PROBE payloads land, to be discarded (allocated at the first one).
        self._probe_sink: memoryview | None = None
        self._probes = 0
        self._checked_s = time.monotonic()
        # A long path's pieces, for whichever connection can take one.
        self._queue = PieceQueue(self.conns, peer)
        # Connections dialled for this link whose handshake is still open: closed
        # with the link, or the acceptor (frozen while we gave up, say) would take
        # them as a link we no longer serve.
        self._handshaking: set[FrameConnection] = set()

    def bytes_received(self) -> int:
        return sum(c.bytes_received for c in self.conns if c is not None)

    def bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.conns if c is not None)

    def timed_bytes_sent(self) -> int:
        """What was sent that the far end's meter may have timed (not shared)."""
        return self.bytes_sent() - self.shared_bytes_sent

    def _silent(self, silent_s: float) -> None:
        exc = PeerLost(f"no sign of life from {self.peer} for {silent_s:.1f}s", peer=self.peer)
        # Said here, within the sender's budget: a peer that stops reading may also
        # stop sending (its own TCP backing off), and then this, not the stall
        # check, is what drops it.
        conn = self.conns[0]
        source = host_of(conn.peername) if conn is not None else self.peer
        REMOTE.warning(log, source, "link %s: %s: %s", self.peer, exc.kind, exc)
        self.fail(exc)

    def _beat(self, meta: dict[str, Any]) -> None:
        """A heartbeat frame to send; before each ping (not each pong), drop a peer
        that has read nothing for too long."""
        if "ping" in meta:
            self._check_reading(time.monotonic())
        self.send_control(FrameKind.HEARTBEAT, meta)

    def _check_reading(self, now: float) -> None:
        liveness = self.heartbeat.liveness
        # Our own loop stalled since the last look (a long reduction): the queue
        # could not move, and that is not the peer's doing.
        ours = now - self._checked_s > 2 * liveness.interval_s
        self._checked_s = now
        for conn in self.conns:
            if conn is None:
                continue
            stalled_s = conn.stalled_s(now, restart=ours)
            if stalled_s > liveness.ceiling_s:
                exc = PeerLost(
                    f"{self.peer} read nothing of {conn.queued_bytes()} queued bytes "
                    f"for {stalled_s:.1f}s",
                    peer=self.peer,
                )
                REMOTE.warning(
                    log, host_of(conn.peername), "link %s: %s: %s", self.peer, exc.kind, exc
                )
                self.fail(exc)

    def resize(self, connections: int) -> None:
        """Set K while no connection is attached yet (the dialler sizes the link
        once its first connection has timed the path)."""
        if any(c is not None for c in self.conns):
            raise RuntimeError(f"link to {self.peer} resized after a connection attached")
        # In place: the piece queue holds this very list.
        self.conns[:] = [None] * connections
        self.k = connections

    @property
    def failed(self) -> bool:
        return self.error is not None

    def hold(self, conn: FrameConnection) -> None:
        """A connection dialled for this link, until its handshake attaches it."""
        if self.error is not None:
            conn.abort()
            return
        self._handshaking.add(conn)

    def attach(self, index: int, conn: FrameConnection) -> None:
        self._handshaking.discard(conn)
        if self.error is not None:
            # Answered after we gave the link up: nobody would serve it.
            conn.abort()
            return
        if not 0 <= index < self.k:
            raise ProtocolError(f"connection index {index} outside 0..{self.k - 1}")
        if self.conns[index] is not None:
            raise ProtocolError(f"duplicate connection {index} from {self.peer}")
        conn.handler = self
        conn.label = f"{self.peer}#{index}"
        conn.on_resume = self._resumed
        self.conns[index] = conn
        if all(c is not None for c in self.conns):
            self.ready.set()
            self.heartbeat.start()

    async def wait_ready(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except TimeoutError:
            exc = PeerLost(f"link to {self.peer} not ready within {timeout_s:.1f}s", peer=self.peer)
            self.fail(exc)
            raise exc from None
        if self.error is not None:
            raise self.error

    # -- sending -----------------------------------------------------------
    def send_data(
        self, meta_head: list[Any], payload: memoryview, fan: int = 1, timed: bool = True
    ) -> None:
        """Send ``payload`` striped over the connections, or on a long path over
        its share of them while ``fan`` links share this node's own. ``timed``
        false: the far end's meter will not time it (``timed_bytes_sent``).

        Every piece's metadata is ``meta_head + [offset, total]`` so the
        receiver can place it without knowing the striping.
        """
        if self.error is not None:
            raise self.error
        total = len(payload)
        if not timed:
            self.shared_bytes_sent += total
        conns = self.conns
        rtt = self.rtt.value(time.monotonic())
        short = rtt is not None and rtt < LONG_PATH_RTT_S
        if not short:
            self._queue.put(meta_head, payload, connections_sharing(self.k, fan))
            return
        pieces = pieces_for(total, self.k, SHORT_PATH_MIN_PIECE_BYTES)
        step = -(-total // pieces) if total else 0
        offset = 0
        while True:
            end = min(total, offset + step)
            conn = conns[self._next]
            self._next = (self._next + 1) % self.k
            if conn is None:
                raise PeerLost(f"link to {self.peer} is not connected", peer=self.peer)
            conn.send(FrameKind.DATA, [*meta_head, offset, total], payload[offset:end])
            offset = end
            if offset >= total:
                break

    def _resumed(self) -> None:
        """A connection handed all it held to the kernel: it may take a piece."""
        if self.error is not None or not len(self._queue):
            return
        try:
            self._queue.pump()
        except CollnetError as exc:
            self.fail(exc)

    def send_probe(self, nbytes: int, warm_bytes: int = 0) -> None:
        """A bandwidth probe: ``nbytes`` of zeros as PROBE pieces striped over the
        connections, which the far end's meter times (collnet.topology.probe),
        behind ``warm_bytes`` it does not time, spread so that every connection
        carries its share of them before its timed pieces.

        A warmed probe is a long path's: its timed bytes go as many small pieces
        through the piece queue, and the far end times them blind to the last
        few (``BurstTimer``), so a connection that stalls meanwhile costs the
        reading little. Otherwise one timed piece per connection, each alone
        big enough for the far end's meter (pieces may arrive one after another).
        """
        if self.error is not None:
            raise self.error
        tailed = warm_bytes > 0
        if tailed:
            pieces = min(TAILED_PROBE_PIECES, max(1, nbytes // TAILED_PROBE_MIN_PIECE_BYTES))
        else:
            pieces = max(1, min(self.k, nbytes // MIN_BURST_BYTES))
        pieces = min(MAX_PROBE_PIECES, max(pieces, -(-nbytes // MAX_PROBE_PIECE_BYTES)))
        size = min(MAX_PROBE_PIECE_BYTES, -(-nbytes // pieces))
        # Warm pieces go round the connections whole times, so each one's come first.
        warm = -(-warm_bytes // MAX_PROBE_PIECE_BYTES) if tailed else 0
        warm = min(-(-warm // self.k), (MAX_PROBE_PIECES - pieces) // self.k) * self.k
        warm_size = min(MAX_PROBE_PIECE_BYTES, -(-warm_bytes // warm)) if warm else 0
        zeros = memoryview(bytes(max(size, warm_size)))
        seq, self._probes = self._probes, self._probes + 1
        for piece in range(warm + pieces):
            meta = ProbePiece(seq, piece, warm + pieces, warm).to_wire()
            if tailed and piece >= warm:
                self._queue.put_piece(FrameKind.PROBE, meta, zeros[:size])
                continue
            conn = self.conns[piece % self.k]
            if conn is None:
                raise PeerLost(f"link to {self.peer} is not connected", peer=self.peer)
            conn.send(FrameKind.PROBE, meta, zeros[: warm_size if piece < warm else size])

    def send_control(self, kind: FrameKind, meta: Any, payload: bytes = b"") -> None:
        conn = self.conns[0]
        if self.error is not None or conn is None:
            raise self.error or PeerLost(f"link to {self.peer} is not connected", peer=self.peer)
        conn.send(kind, meta, payload)

    async def drain(self) -> None:
        await self._queue.drain()
        if self.error is not None:
            raise self.error
        for conn in self.conns:
            if conn is not None:
                await conn.drain()

    # -- ConnectionHandler -------------------------------------------------
    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        if header.kind == FrameKind.DATA:
            if header.payload_len >= METERED_PIECE_BYTES:
                self.rx_meter.begin(time.monotonic(), self.bytes_received)
            return self.router.data_sink(self.peer, meta, header.payload_len)
        if header.kind == FrameKind.PROBE:
            # Bounded before any byte is read.
            probe = ProbePiece.from_wire(meta, header.payload_len)
            if self._metered(probe, header.payload_len):
                self.rx_meter.begin(time.monotonic(), self.bytes_received)
            if self._probe_sink is None:
                self._probe_sink = memoryview(bytearray(MAX_PROBE_PIECE_BYTES))
            return self._probe_sink[: header.payload_len]
        return None

    @staticmethod
    def _metered(probe: ProbePiece, nbytes: int) -> bool:
        """Whether a probe piece is timed by the meter's windows (a burst of many
        timed pieces is timed by ``BurstTimer`` instead)."""
        few = probe.pieces - probe.warm < TAIL_TIMED_MIN_PIECES
        return probe.timed and few and nbytes >= METERED_PIECE_BYTES

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        if frame.kind == FrameKind.DATA:
            if len(frame.payload) >= METERED_PIECE_BYTES:
                self.rx_meter.end(time.monotonic(), self.bytes_received, len(frame.payload))
            self.router.on_data(self.peer, frame.meta, frame.payload)
        elif frame.kind == FrameKind.HEARTBEAT:
            self.heartbeat.on_frame(frame.meta)
        elif frame.kind == FrameKind.PROBE:
            probe, nbytes = ProbePiece.from_wire(frame.meta, len(frame.payload)), len(frame.payload)
            if self._metered(probe, nbytes):
                self.rx_meter.end(time.monotonic(), self.bytes_received, nbytes)
            elif probe.timed:
                now = time.monotonic()
                timed = probe.pieces - probe.warm
                sample = self._burst.landed(probe.seq, timed, now, self.bytes_received())
                if sample is not None:
                    self.rx_meter.add(*sample, now)
        else:
            self.router.on_control(self.peer, frame)

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        if isinstance(exc, ProtocolError):
            # Garbage from a peer costs only its link, never the daemon.
            REMOTE.warning(
                log,
                host_of(conn.peername),
                "link %s: dropping after protocol error: %s",
                self.peer,
                exc,
            )
        self.fail(exc if isinstance(exc, PeerLost) else PeerLost(str(exc), peer=self.peer))

    def fail(self, exc: CollnetError, flush: bool = False) -> None:
        """The link is lost (``flush``: what was queued is still sent before the
        connections close, say a last refusal); the router learns it once."""
        if self.error is not None:
            return
        self.error = exc
        self.ready.set()
        self.heartbeat.stop()
        self._queue.clear()
        self._drop_handshakes()
        for c in self.conns:
            if c is not None:
                c.close() if flush else c.abort()
        self.router.on_link_lost(self.peer, exc)

    def close(self) -> None:
        self.heartbeat.stop()
        if self.error is None:
            self.error = PeerLost(f"link to {self.peer} closed", peer=self.peer)
            self.ready.set()
        self._queue.clear()
        self._drop_handshakes()
        for c in self.conns:
            if c is not None:
                c.close()

    def _drop_handshakes(self) -> None:
        for conn in self._handshaking:
            conn.abort()
        self._handshaking.clear()
