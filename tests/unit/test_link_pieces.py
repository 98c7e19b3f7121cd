"""A link cuts every message that is not tiny over all its connections, so each of
them carries a share of every collective and none is left cold (see
``collnet.transport.link.pieces_for``); the receiver places the pieces by offset."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from collnet.errors import CollnetError
from collnet.topology.throughput import ThroughputMeter
from collnet.transport.connection import FrameConnection
from collnet.transport.link import PeerLink
from collnet.transport.pieceq import MIN_PIECE_BYTES, PIECE_BYTES, PieceQueue, pieces_for
from collnet.wire import Frame, FrameKind, Limits


@given(st.integers(0, 1 << 30), st.integers(1, 64))
def test_pieces_are_one_per_connection_and_never_under_the_minimum(total: int, k: int) -> None:
    pieces = pieces_for(total, k)
    assert 1 <= pieces <= k
    if pieces > 1:
        assert total // pieces >= MIN_PIECE_BYTES
    if total >= k * MIN_PIECE_BYTES:
        assert pieces == k


def test_a_one_mebibyte_message_uses_every_connection_of_an_eight_stream_link() -> None:
    assert pieces_for(1 << 20, 8) == 8
    assert pieces_for(4 << 10, 8) == 1


class Inbox:
    """A router that places pieces into one buffer per message id, by offset."""

    def __init__(self) -> None:
        self.buffers: dict[int, bytearray] = {}
        self.landed: dict[int, int] = {}
        self.done = asyncio.Event()
        self.expect = 0

    def data_sink(self, peer: str, meta: Any, nbytes: int) -> memoryview:
        msg, offset, total = meta[0], meta[-2], meta[-1]
        buf = self.buffers.get(msg)
        if buf is None:
            buf = self.buffers[msg] = bytearray(total)
        return memoryview(buf)[offset : offset + nbytes]

    def on_data(self, peer: str, meta: Any, payload: memoryview) -> None:
        self.landed[meta[0]] = self.landed.get(meta[0], 0) + len(payload)
        if sum(self.landed.values()) == self.expect:
            self.done.set()

    def on_control(self, peer: str, frame: Frame) -> None:
        pass

    def on_link_lost(self, peer: str, exc: CollnetError) -> None:
        pass


@asynccontextmanager
async def linked_pair(k: int, inbox: Inbox) -> AsyncIterator[tuple[PeerLink, PeerLink]]:
    """Two links of ``k`` real loopback TCP connections, attached without a
    handshake (sender, receiver); closed on the way out."""
    loop = asyncio.get_running_loop()
    receiver = PeerLink("a", k, inbox)
    sender = PeerLink("b", k, Inbox())
    accepted: asyncio.Queue[FrameConnection] = asyncio.Queue()

    def accept() -> FrameConnection:
        conn = FrameConnection(receiver, Limits(), "accepting")
        accepted.put_nowait(conn)
        return conn

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for index in range(k):
            _, conn = await loop.create_connection(
                lambda: FrameConnection(sender, Limits(), "b"), "127.0.0.1", port
            )
            sender.attach(index, conn)
            receiver.attach(index, await accepted.get())
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()
        server.close()
        await server.wait_closed()


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds (checked every 10 ms), or fail the test."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_medium_messages_land_whole_with_a_share_on_every_connection() -> None:
    inbox = Inbox()
    async with linked_pair(8, inbox) as (sender, receiver):
        rng = np.random.default_rng(7)
        sizes = [1 << 20, 256 << 10, 3 << 20, 4 << 10]
        messages = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
        inbox.expect = sum(sizes)
        for msg_id, data in enumerate(messages):
            sender.send_data([msg_id], memoryview(data))
        await asyncio.wait_for(inbox.done.wait(), 10)
        assert [bytes(inbox.buffers[i]) for i in range(len(sizes))] == messages
        # 1 MiB + 3 MiB over 8 connections, 256 KiB over 4 of them: every
        # connection carried at least an eighth of the 1 MiB message.
        per_conn = [c.bytes_received for c in receiver.conns if c is not None]
        assert len(per_conn) == 8
        assert min(per_conn) >= (1 << 20) // 8 + (3 << 20) // 8


def test_a_short_path_keeps_large_pieces() -> None:
    from collnet.transport.link import SHORT_PATH_MIN_PIECE_BYTES

    assert pieces_for(1 << 20, 8, SHORT_PATH_MIN_PIECE_BYTES) == 1
    assert pieces_for(8 << 20, 8, SHORT_PATH_MIN_PIECE_BYTES) == 4


class RecordingMeter(ThroughputMeter):
    """The real meter, remembering the size of every piece its windows timed and
    every sample timed elsewhere (a long probe's)."""

    def __init__(self) -> None:
        super().__init__()
        self.timed: list[int] = []
        self.added: list[int] = []

    def end(self, now_s: float, received_bytes: Callable[[], int], piece_bytes: int = 0) -> None:
        self.timed.append(piece_bytes)
        super().end(now_s, received_bytes, piece_bytes)

    def add(self, nbytes: int, elapsed_s: float, now_s: float) -> None:
        self.added.append(nbytes)
        super().add(nbytes, elapsed_s, now_s)


def arrivals(link: PeerLink) -> list[tuple[int, list[int]]]:
    """Every PROBE frame ``link`` gets from now on: (connection index, meta)."""
    seen: list[tuple[int, list[int]]] = []
    on_frame = link.on_frame

    def record(conn: FrameConnection, frame: Frame) -> None:
        if frame.kind == FrameKind.PROBE:
            seen.append((link.conns.index(conn), frame.meta))
        on_frame(conn, frame)

    link.on_frame = record  # type: ignore[method-assign]
    return seen


async def test_a_warmed_probe_times_only_what_follows_the_warm_up_on_every_connection() -> None:
    async with linked_pair(4, Inbox()) as (sender, receiver):
        meter = receiver.rx_meter = RecordingMeter()
        seen = arrivals(receiver)
        sender.send_probe(8 << 20, warm_bytes=24 << 20)
        # 24 MiB of warm-up is 6 pieces of 4 MiB, rounded up to whole rounds of the
        # 4 connections: 8 of 3 MiB; the timed 8 MiB is 16 pieces of 512 KiB, to
        # whichever connection has room, timed from the first to land to the 15th.
        await until(lambda: len(seen) == 24)
        # What the link's counter saw between: the 14 pieces after the first, give or
        # take the parts of pieces in flight at either end (a piece on each connection).
        assert meter.timed == [] and len(meter.added) == 1
        assert 10 * (512 << 10) <= meter.added[0] <= 18 * (512 << 10) + 4096
        assert meter.samples == 1 and meter.bytes_per_s is not None
        for index in range(4):
            warm = [m[1] < m[3] for conn, m in seen if conn == index]
            assert warm[:2] == [True, True] and not any(warm[2:])  # warm-up first
        # Without warm-up, as before: one timed piece per connection, in windows.
        sender.send_probe(8 << 20)
        await until(lambda: len(meter.timed) >= 4)
        assert meter.timed == [2 << 20] * 4 and len(meter.added) == 1


async def test_a_long_probe_is_read_while_a_stalled_connection_still_holds_its_piece() -> None:
    async with linked_pair(4, Inbox()) as (sender, receiver):
        meter = receiver.rx_meter = RecordingMeter()
        stalled = receiver.conns[2]
        assert stalled is not None and stalled.transport is not None
        stalled.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10
        )
        seen = arrivals(receiver)
        # One byte of warm-up per connection, so the stalled one takes a timed piece.
        stalled.transport.pause_reading()
        sender.send_probe(64 << 20, warm_bytes=1)
        await until(lambda: len(meter.added) == 1, 20)
        # 32 pieces of 2 MiB: the sample came at the 29th to land (28 after the first,
        # give or take a piece in flight per connection), and the stalled
        # connection's piece was not one of them.
        assert len(meter.added) == 1 and 25 * (2 << 20) <= meter.added[0] <= 31 * (2 << 20)
        assert not any(conn == 2 for conn, _ in seen)
        stalled.transport.resume_reading()
        await until(lambda: len(seen) == 36, 20)
        assert sorted(m[1] for _, m in seen) == list(range(36)) and len(meter.added) == 1


def test_warm_up_pieces_never_push_a_probe_over_its_piece_limit() -> None:
    from collnet.wire.topology import MAX_PROBE_PIECES

    sent: list[list[int]] = []

    class Conn:
        closed, transport = False, None

        def queued_bytes(self) -> int:
            return 0

        def send(self, kind: Any, meta: list[int], payload: memoryview) -> None:
            sent.append(meta)

    for k in (1, 3, 8, 64):
        link = PeerLink("p", k, Inbox())
        link.conns[:] = [Conn()] * k  # type: ignore[list-item]
        for warm in (0, 1, 5 << 20, 48 << 20, 1 << 30):
            sent.clear()
            link.send_probe(16 << 20, warm_bytes=warm)
            pieces, warm_pieces = sent[0][2], sent[0][3]
            assert len(sent) == pieces <= MAX_PROBE_PIECES
            assert warm_pieces % k == 0 and warm_pieces < pieces
            assert [m[1] for m in sent] == list(range(pieces))
            assert (warm_pieces > 0) == (warm > 0 and pieces - warm_pieces + k <= MAX_PROBE_PIECES)


async def test_on_a_long_path_a_stalled_connection_holds_up_only_what_it_took() -> None:
    """A connection whose far end stops reading (as BBR's PROBE_RTT all but stops
    one) is given no more pieces; the others carry the rest of the message, and
    the whole message lands once it moves again."""
    inbox = Inbox()
    async with linked_pair(4, inbox) as (sender, receiver):
        assert sender.rtt.value(0.0) is None  # a path not known short takes the queue
        stalled = receiver.conns[0]
        assert stalled is not None and stalled.transport is not None
        # Small socket buffers, so what it holds is what the queue gave it.
        stalled.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10
        )
        stalled.transport.pause_reading()
        total = 64 << 20
        data = np.random.default_rng(3).integers(0, 256, total, dtype=np.uint8).tobytes()
        inbox.expect = total
        sender.send_data([0], memoryview(data))
        # Every piece went to a connection, and the others delivered all theirs.
        others = [(s, r) for s, r in zip(sender.conns[1:], receiver.conns[1:], strict=True)]
        await until(
            lambda: not len(sender._queue)
            and all(s is not None and r is not None and s.bytes_sent == r.bytes_received
                    for s, r in others),
            20,
        )  # fmt: skip
        held = total - sum(r.bytes_received for _, r in others if r is not None)
        # Round-robin dealing would have left a quarter (16 MiB) behind it; it holds
        # what its socket buffers took before they filled, and a piece or two.
        assert 0 < held < 4 << 20, held
        assert not inbox.done.is_set()
        stalled.transport.resume_reading()
        await asyncio.wait_for(inbox.done.wait(), 20)
        await asyncio.wait_for(sender.drain(), 20)
        assert bytes(inbox.buffers[0]) == data


class FreeConn:
    """A connection whose kernel takes everything at once (what the queue sees of it)."""

    closed = False
    transport = None

    def __init__(self, sent: list[tuple[int, list[Any], int]], index: int) -> None:
        self.sent, self.index = sent, index

    def queued_bytes(self) -> int:
        return 0

    def send(self, kind: Any, meta: list[Any], payload: memoryview) -> None:
        self.sent.append((self.index, meta, len(payload)))


@given(st.integers(0, 64 << 20), st.integers(1, 16))
def test_a_queued_message_is_cut_whole_in_order_and_spread_over_the_connections(
    total: int, k: int
) -> None:
    sent: list[tuple[int, list[Any], int]] = []
    queue = PieceQueue([FreeConn(sent, i) for i in range(k)], "p")  # type: ignore[misc]
    queue.put([7], memoryview(bytes(total)))
    offsets = [meta[1] for _, meta, _ in sent]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(meta[0] == 7 and meta[2] == total for _, meta, _ in sent)
    assert sum(n for *_, n in sent) == total
    assert all(n <= PIECE_BYTES for *_, n in sent)
    # As many connections as pieces_for asks for each carry a piece.
    assert len({conn for conn, *_ in sent}) == min(k, max(len(sent), pieces_for(total, k)))
    assert len(queue) == 0


@given(st.integers(0, 64 << 20), st.integers(1, 16), st.integers(1, 16))
def test_a_message_limited_to_a_width_uses_only_that_many_connections(
    total: int, k: int, width: int
) -> None:
    sent: list[tuple[int, list[Any], int]] = []
    queue = PieceQueue([FreeConn(sent, i) for i in range(k)], "p")  # type: ignore[misc]
    queue.put([1], memoryview(bytes(total)), width)
    queue.put([2], memoryview(bytes(total)))  # after it, one that may use all of them
    used = min(k, width)
    first = [(conn, n) for conn, meta, n in sent if meta[0] == 1]
    second = [(conn, n) for conn, meta, n in sent if meta[0] == 2]
    assert sum(n for _, n in first) == sum(n for _, n in second) == total
    assert {conn for conn, _ in first} == set(range(min(used, len(first))))
    assert len({conn for conn, _ in second}) == min(k, max(len(second), pieces_for(total, k)))
    assert len(queue) == 0


async def test_a_direct_all_reduces_message_goes_over_its_share_of_a_long_link() -> None:
    """Sent while 3 links share this node's (a direct all-reduce among 4), a
    message crosses 3 of a link's 8 connections, whole; alone, all 8."""
    inbox = Inbox()
    async with linked_pair(8, inbox) as (sender, receiver):
        assert sender.rtt.value(0.0) is None  # not known short: the piece queue
        data = np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
        inbox.expect = len(data)
        sender.send_data([0], memoryview(data), fan=3, timed=False)
        await asyncio.wait_for(inbox.done.wait(), 10)
        assert bytes(inbox.buffers[0]) == data
        carried = [c.bytes_received if c is not None else 0 for c in receiver.conns]
        assert all(n > 0 for n in carried[:3]) and carried[3:] == [0] * 5, carried
        # The far end's meter does not time it, so it counts as untimed.
        assert sender.shared_bytes_sent == len(data)
        assert sender.bytes_sent() - sender.timed_bytes_sent() == len(data)
        inbox.done.clear()
        inbox.expect += len(data)
        sender.send_data([1], memoryview(data))
        await asyncio.wait_for(inbox.done.wait(), 10)
        assert bytes(inbox.buffers[1]) == data
        assert sender.shared_bytes_sent == len(data)  # alone: timed
        assert all(c is not None and c.bytes_received > 0 for c in receiver.conns)
