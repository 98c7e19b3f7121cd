"""The daemon's local API: a pyzmq ROUTER socket speaking msgpack.

Each request is one message ``{"id", "op", ...}`` from a client's DEALER
socket and is handled in its own task, so a client may keep several
collectives in flight. Tensor bytes never travel on this socket: requests
name a shared-memory segment, offset and element count. A malformed request
is answered with a typed ``ProtocolError`` and logged; it never takes the
daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from collnet.errors import CollnetError, ProtocolError

log = logging.getLogger(__name__)

# A sync_state request lists every tensor of the state (up to 65536 of them).
MAX_REQUEST_BYTES = 16 << 20

Handler = Callable[[bytes, dict[str, Any]], Awaitable[dict[str, Any]]]
DisconnectHandler = Callable[[bytes], None]


class IpcServer:
    def __init__(
        self,
        address: str,
        handler: Handler,
        fallback: str | None = None,
        on_disconnect: DisconnectHandler | None = None,
    ) -> None:
        self.address = address
        # A second, best-effort endpoint (tcp://127.0.0.1:PORT) for trainers
        # that cannot reach the ipc:// path.
        self.fallback = fallback
        self.handler = handler
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        # Told the identity of a client whose connection closed (exit, kill -9).
        # zmq reports a closed connection by its file descriptor only, and each
        # request says which descriptor it came in on (SRCFD): that maps the two.
        self.on_disconnect = on_disconnect
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._idents: dict[int, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sock.bind(self.address)
        if self.fallback:
            try:
                self.sock.bind(self.fallback)
            except zmq.ZMQError as exc:
                # Another daemon on this machine holds it: trainers use the ipc path.
                log.warning("ipc: not serving on %s too: %s", self.fallback, exc)
                self.fallback = None
        self._loop = asyncio.ensure_future(self._serve())
        self._watch = asyncio.ensure_future(self._watch_disconnects())

    async def _serve(self) -> None:
        while True:
            try:
                frames = await self.sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM or self.sock.closed:
                    return
                log.warning("ipc receive failed: %s", exc)
                continue
            parts = [f.bytes for f in frames]
            with contextlib.suppress(zmq.ZMQError):
                self._idents[frames[-1].get(zmq.SRCFD)] = parts[0]
            if len(parts) != 2:
                log.warning("ipc: dropping a message of %d parts", len(parts))
                continue
            ident, body = parts
            task = asyncio.ensure_future(self._one(ident, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, ident: bytes, body: bytes) -> None:
        rid: Any = None
        try:
            try:
                req = msgpack.unpackb(body, raw=False, strict_map_key=True)
            except Exception as exc:
                raise ProtocolError(f"request is not valid msgpack: {exc}") from None
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ProtocolError("request must be a map with a string 'op'")
            rid = req.get("id")
            result = await self.handler(ident, req)
            reply: dict[str, Any] = {"id": rid, "ok": True, **result}
        except CollnetError as exc:
            if isinstance(exc, ProtocolError):
                log.warning("ipc: bad request from client %s: %s", ident.hex(), exc)
            reply = {"id": rid, "ok": False, "error": exc.to_wire()}
        except Exception as exc:
            log.exception("ipc: request failed")
            reply = {
                "id": rid,
                "ok": False,
                "error": CollnetError(f"internal daemon error: {exc!r}").to_wire(),
            }
        try:
            await self.sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)])
        except zmq.ZMQError as exc:
            log.warning("ipc: cannot reply to %s: %s", ident.hex(), exc)

    async def _watch_disconnects(self) -> None:
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except zmq.ZMQError:
                return
            ident = self._idents.pop(int(event["value"]), None)
            if ident is not None and self.on_disconnect is not None:
                try:
                    self.on_disconnect(ident)
                except Exception:
                    log.exception("ipc: disconnect handler failed")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
        if self._watch is not None:
            self._watch.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._monitor.close(0)
        for t in list(self._tasks):
            t.cancel()
        self.sock.close(0)
        self.ctx.term()
