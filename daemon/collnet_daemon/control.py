"""The daemon's control connection to the coordinator.

Control messages are CONTROL frames whose metadata is a msgpack map with a
type ``t``. Requests carry an ``id`` and are answered by ``{"t": "reply",
"id", "ok", ...}``; the coordinator may also push ``{"t": "world"}`` when the
world changes under the peer (a member was lost). The coordinator never sees
tensor data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from collnet.errors import CollnetError, DaemonUnavailable, ProtocolError
from collnet.membership import WorldView, auth
from collnet.membership.liveness import Liveness
from collnet.transport.connection import FrameConnection
from collnet.transport.heartbeat import Heartbeat
from collnet.wire import Frame, FrameKind, Header, Limits

log = logging.getLogger(__name__)

# Control frames may carry a payload (state manifests, and the coordinator's
# answer holding every member's): bounded, far below anything a data link takes.
MAX_CONTROL_PAYLOAD = 64 << 20
CONTROL_LIMITS = Limits(max_payload_bytes=MAX_CONTROL_PAYLOAD)


class CoordinatorClient:
    """RPC over one control connection; see the module docstring."""

    def __init__(
        self,
        on_world: Callable[[WorldView], None],
        liveness: Callable[[], Liveness] = Liveness,
        secret: bytes | None = None,
    ) -> None:
        self.on_world = on_world
        self.liveness = liveness
        self._initiator = auth.Initiator(secret)
        self._answered: asyncio.Future[None] | None = None
        self.conn: FrameConnection | None = None
        self.lost: asyncio.Future[CollnetError] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._heartbeat: Heartbeat | None = None

    async def connect(self, host: str, port: int, timeout_s: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        self.lost = loop.create_future()
        try:
            _, self.conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: FrameConnection(self, CONTROL_LIMITS, "coordinator"),
                    host,
                    port,
                ),
                timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise DaemonUnavailable(f"cannot reach coordinator {host}:{port}: {exc}") from None
        conn = self.conn
        # The handshake first: nothing else is accepted before it completes.
        self._answered = loop.create_future()
        conn.send(FrameKind.HELLO, self._initiator.hello({}))
        try:
            await asyncio.wait_for(asyncio.shield(self._answered), timeout_s)
        except TimeoutError:
            conn.abort()
            raise DaemonUnavailable(f"coordinator {host}:{port} did not answer HELLO") from None
        except CollnetError as exc:
            conn.abort()
            raise DaemonUnavailable(
                f"handshake with coordinator {host}:{port} failed: {exc}"
            ) from exc
        self._heartbeat = Heartbeat(
            lambda meta: conn.send(FrameKind.HEARTBEAT, meta),
            lambda: conn.bytes_received,
            self._silent,
            self.liveness(),
        )
        self._heartbeat.start()

    async def call(
        self, t: str, timeout_s: float | None = None, payload: bytes = b"", **fields: Any
    ) -> dict[str, Any]:
        """One request; a reply frame's payload, if any, is in the reply under ``payload``."""
        if not self.connected:
            raise DaemonUnavailable("not connected to the coordinator")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.conn.send(FrameKind.CONTROL, {"t": t, "id": rid, **fields}, payload)
        try:
            reply = await asyncio.wait_for(fut, timeout_s)
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            raise CollnetError.from_wire(reply.get("error") or {})
        return reply

    @property
    def connected(self) -> bool:
        # A connection whose loss was reported may not be marked closed yet
        # (EOF comes before connection_lost): a request sent on it would wait forever.
        lost = self.lost is not None and self.lost.done()
        return self.conn is not None and not self.conn.closed and not lost

    @property
    def rtt_s(self) -> float | None:
        """Smoothed heartbeat RTT to the coordinator (None before the first pong)."""
        return None if self._heartbeat is None else self._heartbeat.liveness.srtt_s

    def _silent(self, silent_s: float) -> None:
        log.error("coordinator silent for %.1fs: treating it as lost", silent_s)
        if self.conn is not None:
            self.conn.abort()

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.conn is not None:
            self.conn.close()

    # -- ConnectionHandler -------------------------------------------------
    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        if header.kind != FrameKind.CONTROL or self._answered is None or not self._answered.done():
            raise ProtocolError(f"the coordinator sent a payload on a {header.kind.name} frame")
        return None

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        if frame.kind == FrameKind.HELLO and self._answered is not None:
            if self._answered.done():
                raise ProtocolError("the coordinator sent a second HELLO")
            final, verdict = self._initiator.on_answer(frame.meta, "the coordinator")
            if final is not None:
                conn.send(FrameKind.HELLO, final)
            if verdict is not None:
                log.error("handshake with the coordinator failed: %s", verdict)
                self._answered.set_exception(verdict)
                raise verdict
            self._answered.set_result(None)
            return
        if frame.kind == FrameKind.HEARTBEAT:
            if self._heartbeat is not None:
                self._heartbeat.on_frame(frame.meta)
            return
        meta = frame.meta
        if frame.kind != FrameKind.CONTROL or not isinstance(meta, dict):
            raise ProtocolError(f"unexpected {frame.kind.name} from the coordinator")
        t = meta.get("t")
        if t == "reply":
            fut = self._pending.get(meta.get("id", -1))
            if fut is not None and not fut.done():
                if frame.payload:
                    meta["payload"] = bytes(frame.payload)
                fut.set_result(meta)
        elif t == "world":
            self.on_world(WorldView.from_wire(meta.get("world")))
        else:
            raise ProtocolError(f"unknown control message {t!r}")

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._answered is not None and not self._answered.done():
            self._answered.set_exception(exc)
        err = DaemonUnavailable(f"lost the coordinator: {exc.message}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(err)
