"""What a peer that does not read can make us queue: copied frames are capped, and a
queue that makes no progress past the heartbeat ceiling fails the link."""

from __future__ import annotations

from typing import Any

import pytest
from recording_router import RecordingRouter

from collnet.errors import CollnetError, PeerLost
from collnet.membership.liveness import Liveness
from collnet.transport.connection import MAX_COPIED_BACKLOG_BYTES, FrameConnection
from collnet.transport.link import PeerLink
from collnet.wire import Frame, FrameKind, Header, Limits


class FakeTransport:
    """Keeps what is written in user space until ``to_kernel`` moves it on."""

    def __init__(self) -> None:
        self.queued = 0
        self.aborted = False
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return ("10.0.0.9", 4242) if name == "peername" else None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.queued += len(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.queued += sum(len(p) for p in parts)

    def get_write_buffer_size(self) -> int:
        return self.queued

    def to_kernel(self, nbytes: int) -> None:
        self.queued = max(0, self.queued - nbytes)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class Handler:
    def __init__(self) -> None:
        self.lost: list[CollnetError] = []

    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> None:
        return None

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        pass

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        self.lost.append(exc)


def _conn() -> tuple[FrameConnection, FakeTransport, Handler]:
    handler = Handler()
    conn = FrameConnection(handler, Limits(), "p1#0")
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, handler


def test_answers_piling_up_for_a_peer_that_does_not_read_drop_the_connection() -> None:
    conn, transport, handler = _conn()
    sent = 0
    with pytest.raises(PeerLost, match="not reading"):
        while True:
            conn.send(FrameKind.HEARTBEAT, {"pong": sent})
            sent += 1
    assert MAX_COPIED_BACKLOG_BYTES < transport.queued < MAX_COPIED_BACKLOG_BYTES + 100
    assert transport.aborted and isinstance(handler.lost[0], PeerLost)
    assert len(conn._copies) == 1  # one entry for the whole run of answers


def test_answers_that_drain_never_count_and_data_payloads_are_not_copies() -> None:
    conn, transport, handler = _conn()
    payload = memoryview(bytearray(1 << 20))
    for i in range(64):  # 64 MiB of tensor views queued, answers interleaved
        conn.send(FrameKind.DATA, [1, "t", 0, i, 7, 0, len(payload)], payload)
        conn.send(FrameKind.HEARTBEAT, {"pong": i})
    assert conn._copied_backlog < 64 * 40 and not handler.lost
    transport.to_kernel(transport.queued)
    for i in range(MAX_COPIED_BACKLOG_BYTES // 20):  # each one written at once
        conn.send(FrameKind.HEARTBEAT, {"pong": i})
        transport.to_kernel(transport.queued)
    # Counted lazily, at the next copy: at most the last one is still on the books.
    assert not handler.lost and conn._copied_backlog < 40


def test_stalled_counts_only_while_bytes_are_queued_and_none_move() -> None:
    conn, transport, _ = _conn()
    assert conn.stalled_s(100.0) == 0.0  # nothing queued
    conn.send(FrameKind.HEARTBEAT, {"ping": 1})
    # Stuck since the last look that saw the queue empty or moving.
    assert conn.stalled_s(101.0) == 1.0
    assert conn.stalled_s(104.0) == 4.0
    transport.to_kernel(5)
    assert conn.stalled_s(105.0) == 0.0  # it moved
    assert conn.stalled_s(109.0) == 4.0
    assert conn.stalled_s(110.0, restart=True) == 0.0


def test_a_link_whose_peer_reads_nothing_past_the_ceiling_fails_naming_it() -> None:
    router = RecordingRouter()
    # Two connections, one attached: the link is not ready, so no heartbeat task
    # runs, and the checks are driven by hand below.
    link = PeerLink("p1", 2, router, Liveness(0.5, 2.0, 3.0))
    conn, transport, _ = _conn()
    link.attach(0, conn)
    link._checked_s = 100.0
    conn.send(FrameKind.HEARTBEAT, {"ping": 0})
    for t in (100.5, 101.0, 101.5, 102.0, 102.5, 103.0, 103.5):
        link._check_reading(t)
        assert not router.lost
    link._check_reading(104.0)
    ((peer, exc),) = router.lost
    assert peer == "p1" and isinstance(exc, PeerLost) and exc.peer == "p1"
    assert "read nothing" in exc.message and transport.aborted


def test_our_own_stall_is_not_blamed_on_the_peer() -> None:
    router = RecordingRouter()
    link = PeerLink("p1", 2, router, Liveness(0.5, 2.0, 3.0))
    conn, _, _ = _conn()
    link.attach(0, conn)
    link._checked_s = 100.0
    conn.send(FrameKind.HEARTBEAT, {"ping": 0})
    link._check_reading(100.5)
    link._check_reading(108.0)  # this loop was blocked for 7.5 s
    link._check_reading(108.5)
    assert not router.lost


def test_a_silent_peer_is_dropped_with_a_warning_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A peer that stops reading may stop sending too (its TCP backs off): then the
    # liveness check, not the stall check, drops it, and that must be said.
    router = RecordingRouter()
    link = PeerLink("p1", 2, router, Liveness(0.5, 2.0, 3.0))
    conn, transport, _ = _conn()
    link.attach(0, conn)
    with caplog.at_level("WARNING", logger="collnet.transport.link"):
        link._silent(3.2)
    ((peer, exc),) = router.lost
    assert peer == "p1" and isinstance(exc, PeerLost) and "no sign of life" in exc.message
    assert transport.aborted
    (line,) = [r.getMessage() for r in caplog.records if "p1" in r.getMessage()]
    assert "PeerLost" in line and "no sign of life from p1 for 3.2s" in line
