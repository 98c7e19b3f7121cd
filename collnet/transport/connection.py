"""One TCP connection carrying collnet frames, driven by asyncio callbacks.

``FrameConnection`` is an ``asyncio.BufferedProtocol``: the event loop asks it
where the next bytes go (``get_buffer``) and the sans-I/O ``FrameReader``
answers with a view straight into the tensor buffer a collective
preallocated, so payload bytes are written once by the kernel and never copied
by Python. What to do with a frame is decided by a ``ConnectionHandler``,
which can be swapped (a data connection starts with a handshake handler and
is then attached to its peer link).

Bad input closes only this connection: the handler's ``on_lost`` learns the
typed error, and the error is logged once (within the remote host's budget of
lines, ``collnet.transport.loglimit``).

What a peer can make us queue is bounded. Payloads of DATA frames are views
of tensors (their memory is the caller's, held until ``drain``); every other
frame is a copy (a pong, an ABORT, a refusal), and those still queued may
not exceed ``MAX_COPIED_BACKLOG_BYTES``: a peer that keeps asking and never
reads loses the connection (``PeerLost``). ``stalled_s`` tells the link how
long bytes have been queued without any reaching the kernel, so a peer that
stops reading altogether is dropped like a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from collnet.errors import AuthError, CollnetError, PeerLost, ProtocolError
from collnet.transport.loglimit import REMOTE, host_of
from collnet.transport.sockbuf import kernel_caps
from collnet.wire import Frame, FrameKind, FrameReader, Header, Limits, encode_frame

log = logging.getLogger(__name__)

# Copied frames (everything but DATA payloads) queued for a peer that is not
# reading them: past this the connection is dropped.
MAX_COPIED_BACKLOG_BYTES = 4 << 20


class ConnectionHandler(Protocol):
    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        """Where the payload of the frame being read goes (None: a fresh buffer)."""
        ...

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None: ...

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None: ...


def tune_socket(sock: socket.socket | None) -> None:
    """No Nagle delay; kernel buffers fixed only where that beats autotuning
    (``collnet.transport.sockbuf``)."""
    if sock is None:
        return
    caps = kernel_caps()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option, buffer in ((socket.SO_SNDBUF, caps.send), (socket.SO_RCVBUF, caps.receive)):
            size = buffer.request()
            if size is not None:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
    except OSError:  # pragma: no cover - e.g. a unix socket in tests
        pass


class FrameConnection(asyncio.BufferedProtocol):
    """A framed, back-pressured TCP connection; see the module docstring."""

    def __init__(self, handler: ConnectionHandler, limits: Limits, label: str = "") -> None:
        self.handler = handler
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        self.closed = False
        self._reader = FrameReader(limits, self._sink)
        self._can_write = asyncio.Event()
        self._can_write.set()
        # Told when everything queued has reached the kernel (a link then hands
        # this connection its next piece: collnet.transport.pieceq).
        self.on_resume: Callable[[], None] | None = None
        self._lost_reported = False
        self.bytes_received = 0
        self.bytes_sent = 0
        # Copied frames not yet written: (bytes_sent at their end, their size).
        self._copies: deque[tuple[int, int]] = deque()
        self._copied_backlog = 0
        # What stalled_s saw last: bytes written, and since when.
        self._written_seen = -1  # so that the first look starts the clock
        self._progress_s = 0.0

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance.
        self.transport = tr = transport  # type: ignore[assignment]
        self.peername = transport.get_extra_info("peername")
        tune_socket(transport.get_extra_info("socket"))
        # Paused whenever anything is queued, resumed when the queue is empty:
        # drain() then means "every byte handed to send() reached the kernel",
        # which is what lets a collective complete while the payloads it sent
        # are views of a tensor that the caller will reuse. Under TLS, "reached
        # the kernel" reads "was encrypted" (the tensor's bytes are not needed
        # after that), and the TLS transport pauses at size >= high where a
        # plain one pauses at size > high: high=1 means the same there.
        tls = transport.get_extra_info("ssl_object") is not None
        tr.set_write_buffer_limits(high=1 if tls else 0, low=0)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            return self._reader.get_buffer()
        except CollnetError as exc:  # reader failed: swallow bytes until close lands
            self._fail(exc)
            return memoryview(bytearray(65536))

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.bytes_received += nbytes
        try:
            frames = self._reader.buffer_updated(nbytes)
            for frame in frames:
                if self.closed:
                    break  # a frame before these closed us: the rest are not ours to act on
                self.handler.on_frame(self, frame)
        except CollnetError as exc:
            self._fail(exc)
        except Exception as exc:  # a handler bug must not kill the event loop
            log.exception("connection %s: handler failed", self.label)
            self._fail(ProtocolError(f"internal error handling frame: {exc!r}"))

    def eof_received(self) -> bool | None:
        self._report_lost(PeerLost(f"connection {self.label} closed by peer", peer=self.label))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        reason = f"connection {self.label} lost" + (f": {exc}" if exc else "")
        self._report_lost(PeerLost(reason, peer=self.label))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self.on_resume is not None:
            self.on_resume()

    # -- API ---------------------------------------------------------------
    def send(
        self, kind: FrameKind, meta: Any, payload: bytes | memoryview = b"", flags: int = 0
    ) -> None:
        """Queue a frame; the payload is written from its own memory, not copied."""
        if self.closed or self.transport is None:
            raise PeerLost(f"connection {self.label} is closed", peer=self.label)
        head, body = encode_frame(kind, meta, payload, flags)
        if len(body):
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        size = len(head) + len(body)
        self.bytes_sent += size
        # A probe's pieces are bounded by its sender's policy (collnet.topology.probe).
        if kind != FrameKind.DATA and kind != FrameKind.PROBE:
            self._count_copy(size)

    def queued_bytes(self) -> int:
        """Bytes handed to ``send`` that have not reached the kernel yet."""
        if self.transport is None or self.closed:
            return 0
        return int(self.transport.get_write_buffer_size())

    def stalled_s(self, now_s: float, restart: bool = False) -> float:
        """How long bytes have been queued here without any reaching the kernel
        (0 while the queue is empty or moving; ``restart``: count from now on);
        call it periodically."""
        queued = self.queued_bytes()
        written = self.bytes_sent - queued
        if restart or not queued or written != self._written_seen:
            self._written_seen = written
            self._progress_s = now_s
            return 0.0
        return now_s - self._progress_s

    async def drain(self) -> None:
        """Wait until every queued byte has been handed to the kernel."""
        await self._can_write.wait()
        if self.closed:
            raise PeerLost(f"connection {self.label} is closed", peer=self.label)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    # -- internals ---------------------------------------------------------
    def _sink(self, header: Header, meta: Any) -> memoryview | None:
        return self.handler.payload_sink(self, header, meta)

    def _count_copy(self, size: int) -> None:
        """A copied frame of ``size`` bytes was queued; drop a peer that lets too
        many of them pile up (only frames that are not DATA are tracked, so the
        data path does no work here)."""
        written = self.bytes_sent - self.queued_bytes()
        copies = self._copies
        while copies and copies[0][0] <= written:
            self._copied_backlog -= copies.popleft()[1]
        if self.bytes_sent > written:
            if copies and copies[-1][0] == self.bytes_sent - size:
                # Right behind the previous copy: one entry for the run of them, so
                # a flood of small answers costs no bookkeeping per frame.
                copies[-1] = (self.bytes_sent, copies[-1][1] + size)
            else:
                copies.append((self.bytes_sent, size))
            self._copied_backlog += size
        if self._copied_backlog > MAX_COPIED_BACKLOG_BYTES:
            exc = PeerLost(
                f"connection {self.label} is not reading: {self._copied_backlog} bytes of "
                "answers and control frames queued",
                peer=self.label,
            )
            self._fail(exc)
            raise exc

    def _fail(self, exc: CollnetError) -> None:
        if not self._lost_reported:
            REMOTE.warning(
                log,
                host_of(self.peername),
                "connection %s (%s): %s: %s",
                self.label,
                self.peername,
                exc.kind,
                exc,
            )
        self._report_lost(exc)
        if isinstance(exc, AuthError):
            self.close()  # flush our last handshake frame so the far side sees the mismatch too
        else:
            self.abort()

    def _report_lost(self, exc: CollnetError) -> None:
        if self._lost_reported:
            return
        self._lost_reported = True
        self.handler.on_lost(self, exc)
