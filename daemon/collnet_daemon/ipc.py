"""The daemon's local API: pyzmq ROUTER sockets speaking msgpack.

Each request is one message ``{"id", "op", ...}`` from a client's DEALER
socket (on TCP preceded by a frame holding the token) and is handled in its
own task, so a client may keep several collectives in flight. Tensor bytes
never travel on these sockets: requests name a shared-memory segment, offset
and element count. A malformed request is answered with a typed
``ProtocolError`` and logged; it never takes the daemon down.

Who may send requests is ``localaccess.LocalAccess``'s business: each
endpoint (the ipc socket, the optional TCP fallback) has its own ROUTER
socket, so every request is known to come from one kind of endpoint and is
checked by that endpoint's rule (peer credentials, or the token) before it
is even parsed. The requester's uid is set in the request's task
(``buffers.REQUESTER_UID``) for the shared-memory checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from collnet.errors import AuthError, CollnetError, InvalidArgument, ProtocolError
from collnet_daemon.buffers import REQUESTER_UID
from collnet_daemon.localaccess import LocalAccess

log = logging.getLogger(__name__)

# A sync_state request lists every tensor of the state (up to 65536 of them).
MAX_REQUEST_BYTES = 16 << 20

Handler = Callable[[bytes, dict[str, Any]], Awaitable[dict[str, Any]]]
DisconnectHandler = Callable[[bytes], None]


@dataclass
class _Endpoint:
    """One bound address: its socket, its disconnect monitor, and its rule."""

    address: str
    sock: zmq.asyncio.Socket
    monitor: zmq.asyncio.Socket
    # Prepended to this endpoint's zmq identities before the handler sees them,
    # so clients of two endpoints are never taken for one another.
    prefix: bytes

    @property
    def by_token(self) -> bool:
        return not self.address.startswith("ipc://")


class IpcServer:
    def __init__(
        self,
        address: str,
        handler: Handler,
        fallback: str | None = None,
        on_disconnect: DisconnectHandler | None = None,
        access: LocalAccess | None = None,
    ) -> None:
        self.address = address
        # A second endpoint (tcp://127.0.0.1:PORT, token required) for trainers
        # that cannot reach the ipc:// path; off unless configured.
        self.fallback = fallback
        self.handler = handler
        self.access = access or LocalAccess()
        self.ctx = zmq.asyncio.Context()
        # Told the identity of a client whose connection closed (exit, kill -9).
        # zmq reports a closed connection by its file descriptor only, and each
        # request says which descriptor it came in on (SRCFD): that maps the two.
        self.on_disconnect = on_disconnect
        self._endpoints: list[_Endpoint] = []
        self._idents: dict[int, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _endpoint(self, address: str, prefix: bytes) -> _Endpoint:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        return _Endpoint(address, sock, monitor, prefix)

    def start(self) -> None:
        main = self._endpoint(self.address, b"")
        try:
            self._bind(main)
        except BaseException:
            self._close_endpoint(main)
            raise
        self._endpoints.append(main)
        if self.fallback:
            extra = self._endpoint(self.fallback, b"tcp:")
            try:
                self._bind(extra)
            except zmq.ZMQError as exc:
                # Another daemon on this machine holds it: trainers use the ipc path.
                log.warning("ipc: not serving on %s too: %s", self.fallback, exc)
                self._close_endpoint(extra)
                self.fallback = None
            else:
                self._endpoints.append(extra)
        if any(e.by_token for e in self._endpoints):
            self.access.issue_token()
            log.info("ipc: TCP clients need the token in %s", self.access.token_file)
        for endpoint in self._endpoints:
            self._spawn(self._serve(endpoint))
            self._spawn(self._watch_disconnects(endpoint))

    def _bind(self, endpoint: _Endpoint) -> None:
        if endpoint.by_token:
            endpoint.sock.bind(endpoint.address)
        else:
            self.access.bind_ipc(endpoint.sock, endpoint.address)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, endpoint: _Endpoint) -> None:
        sock = endpoint.sock
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM or sock.closed:
                    return
                log.warning("ipc receive failed: %s", exc)
                continue
            parts = [f.bytes for f in frames]
            ident = endpoint.prefix + parts[0]
            with contextlib.suppress(zmq.ZMQError):
                self._idents[frames[-1].get(zmq.SRCFD)] = ident
            if len(parts) not in (2, 3):
                log.warning("ipc: dropping a message of %d parts", len(parts))
                continue
            # [ident, body] or, with a token (the SDK sends one on TCP), [ident, token, body].
            token = parts[1] if len(parts) == 3 else None
            try:
                if endpoint.by_token:
                    uid = self.access.check_token(ident, token)
                else:
                    uid = self.access.check_ipc(ident, _peer_address(frames[-1]))
            except AuthError as exc:
                self._spawn(self._reply(sock, parts[0], _request_id(parts[-1]), exc.to_wire()))
                continue
            self._spawn(self._one(sock, parts[0], ident, uid, parts[-1]))

    async def _one(
        self, sock: zmq.asyncio.Socket, raw: bytes, ident: bytes, uid: int, body: bytes
    ) -> None:
        # Seen by everything this request does, tasks it starts included.
        REQUESTER_UID.set(uid)
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
            if isinstance(exc, ProtocolError | InvalidArgument):
                log.warning("ipc: bad request from client %s: %s", ident.hex(), exc)
            reply = {"id": rid, "ok": False, "error": exc.to_wire()}
        except Exception as exc:
            log.exception("ipc: request failed")
            reply = {
                "id": rid,
                "ok": False,
                "error": CollnetError(f"internal daemon error: {exc!r}").to_wire(),
            }
        await self._send(sock, raw, reply)

    async def _reply(
        self, sock: zmq.asyncio.Socket, raw: bytes, rid: Any, error: dict[str, Any]
    ) -> None:
        await self._send(sock, raw, {"id": rid, "ok": False, "error": error})

    async def _send(self, sock: zmq.asyncio.Socket, raw: bytes, reply: dict[str, Any]) -> None:
        try:
            await sock.send_multipart([raw, msgpack.packb(reply, use_bin_type=True)])
        except zmq.ZMQError as exc:
            log.warning("ipc: cannot reply to %s: %s", raw.hex(), exc)

    async def _watch_disconnects(self, endpoint: _Endpoint) -> None:
        while True:
            try:
                event = parse_monitor_message(await endpoint.monitor.recv_multipart())
            except zmq.ZMQError:
                return
            ident = self._idents.pop(int(event["value"]), None)
            if ident is not None and self.on_disconnect is not None:
                try:
                    self.on_disconnect(ident)
                except Exception:
                    log.exception("ipc: disconnect handler failed")

    def _close_endpoint(self, endpoint: _Endpoint) -> None:
        with contextlib.suppress(zmq.ZMQError):
            endpoint.sock.disable_monitor()
        endpoint.monitor.close(0)
        endpoint.sock.close(0)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for endpoint in self._endpoints:
            self._close_endpoint(endpoint)
        self._endpoints.clear()
        self.access.close()
        self.ctx.term()


def _peer_address(frame: zmq.Frame) -> str | None:
    """libzmq's Peer-Address of the connection ``frame`` came in on."""
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return None


def _request_id(body: bytes) -> Any:
    """The id of a refused request, so its sender's wait gets the refusal."""
    try:
        req = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:
        return None
    return req.get("id") if isinstance(req, dict) else None
