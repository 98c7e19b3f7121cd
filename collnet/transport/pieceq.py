"""Pieces of a long link's messages, handed to whichever connection can take one.

On a long fat path every connection of a link carries a share of each
message. Dealt round-robin up front, each connection's share waits in its own
queue, and a connection that slows down holds up every message behind its
share: TCP BBR drops each busy connection to four packets for about 200 ms
plus a round trip every ten seconds (PROBE_RTT), and in the WAN lab (1 Gbit/s,
100 ms, K = 4) a 64 MiB all-reduce that met one took 1.1 s instead of 0.86 s
(`ss -tin` showed the stalled connection at cwnd 4).

So on a long path the link keeps its pieces here instead and a connection
takes the next one only when it has handed everything it holds to the kernel,
whose own queue of unsent bytes is capped (``TCP_NOTSENT_LOWAT``): a stalled
connection then holds at most one piece and the cap (128 KiB), and the
others carry the rest. Pieces keep their order; which connection carries one does not
matter to the receiver, which places pieces by offset. A message may be
limited to the first few connections (``width``: a direct all-reduce shares
this node's link among its peers' links, ``collnet.topology.striping``); the
others then wait for a piece that may use them.

The queue holds views of the senders' buffers (no copy), as a connection's
queue does; ``drain`` waits for it to empty and ``clear`` drops it when the
link fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any

from collnet.errors import PeerLost
from collnet.transport.connection import FrameConnection
from collnet.wire import FrameKind

# A message is cut into one piece per connection (up to K) as long as each piece
# keeps at least this much: below it a piece costs more in per-frame overhead than
# striping gains. It is small on purpose (see ``pieces_for``).
MIN_PIECE_BYTES = 64 << 10
# At most this much, so that a stalled connection holds up little.
PIECE_BYTES = 128 << 10
# Unsent bytes the kernel may keep per connection beyond what is in flight: what
# a stalled connection holds up besides its piece. A trade-off, measured in the
# WAN lab (4 daemons on 2 cores, 64 MiB fp32 ring, 10-12 samples each): at 100
# ms, 128 KiB held up 1 sample of 12, 1 MiB 3 of 10 (1 MiB leaves a connection
# at four packets for four round trips); at 200 ms, 128 or 512 KiB never ran
# under 1.03 s where 1 MiB ran 6 of 10 at 0.91-0.98 s (a sender slow to wake
# starves its connections; the cause is not pinned down). The default scenario
# (100 ms) decides.
NOTSENT_LOWAT_BYTES = 128 << 10


def pieces_for(total_bytes: int, k: int, min_piece_bytes: int = MIN_PIECE_BYTES) -> int:
    """How many pieces (one per connection) a message of ``total_bytes`` is cut into.

    TCP's window and its model of the path grow only on a connection that
    carries bytes, in the direction it carries them. Sent whole, each medium
    message (a 1 MiB star contribution, a ring's chunk) went round-robin to
    the next of K connections, and each collective met a connection that had
    never carried one: 4 round trips of slow start per hop in the WAN lab
    (64 KiB, 255 KiB, 666 KiB, the rest), 0.7 s for a 1 MiB star at 100 ms
    where the links allow 0.13 s. Cut over all K, every such message keeps
    all K connections warm alike, and on a cold link K windows ramp at once.
    A short path takes larger pieces (``PeerLink``); a long one cuts each of
    these further, to at most ``PIECE_BYTES`` (``PieceQueue``).
    """
    return max(1, min(k, total_bytes // min_piece_bytes))


def cap_unsent(conn: FrameConnection, nbytes: int = NOTSENT_LOWAT_BYTES) -> None:
    """Keep at most ``nbytes`` unsent in ``conn``'s kernel queue (beyond what the
    congestion window lets fly); the rest waits here, free to go elsewhere."""
    sock = None if conn.transport is None else conn.transport.get_extra_info("socket")
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is None or option is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, nbytes)


class PieceQueue:
    """See the module docstring."""

    def __init__(self, conns: Sequence[FrameConnection | None], peer: str) -> None:
        self.conns = conns
        self.peer = peer
        # Each piece with the number of connections (the first ones) it may use.
        self._pieces: deque[tuple[FrameKind, Any, memoryview, int]] = deque()
        self._empty = asyncio.Event()
        self._empty.set()
        self._capped: set[int] = set()
        self._next = 0

    def __len__(self) -> int:
        return len(self._pieces)

    def put(self, meta_head: list[Any], payload: memoryview, width: int | None = None) -> None:
        """Queue ``payload`` in pieces (one per connection of the first ``width``,
        all by default; at most ``PIECE_BYTES`` each) and send what can go now."""
        total = len(payload)
        k = len(self.conns)
        width = k if width is None else max(1, min(k, width))
        step = min(PIECE_BYTES, -(-total // pieces_for(total, width))) or 1
        for offset in range(0, max(total, 1), step):
            end = min(total, offset + step)
            meta = [*meta_head, offset, total]
            self._pieces.append((FrameKind.DATA, meta, payload[offset:end], width))
        self._empty.clear()
        self.pump()

    def put_piece(self, kind: FrameKind, meta: Any, payload: memoryview) -> None:
        """Queue one piece cut by the caller (a probe's) and send what can go now."""
        self._pieces.append((kind, meta, payload, len(self.conns)))
        self._empty.clear()
        self.pump()

    def pump(self) -> None:
        """Hand pieces to connections that hold nothing unsent, in turn."""
        pieces, conns, k = self._pieces, self.conns, len(self.conns)
        idle = 0
        while pieces and idle < k:
            i = self._next
            self._next = (i + 1) % k
            conn = conns[i]
            if conn is None:
                raise PeerLost(f"link to {self.peer} is not connected", peer=self.peer)
            if i >= pieces[0][3] or conn.closed or conn.queued_bytes():
                idle += 1
                continue
            if i not in self._capped:
                self._capped.add(i)
                cap_unsent(conn)
            kind, meta, view, _ = pieces.popleft()
            conn.send(kind, meta, view)
            idle = 0
        if not pieces:
            self._empty.set()

    async def drain(self) -> None:
        """Wait until every queued piece went to a connection."""
        await self._empty.wait()

    def clear(self) -> None:
        self._pieces.clear()
        self._empty.set()
