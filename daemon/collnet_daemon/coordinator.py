"""The coordinator service: membership over TCP, no tensor data.

A thin asyncio shell around ``collnet.membership.CoordinatorState``: each
control connection is one peer; requests become state-machine events and the
returned effects become replies and pushes. A closed control connection is a
lost peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgpack

from collnet.errors import CollnetError, ProtocolError
from collnet.membership import (
    BarrierReply,
    CoordinatorState,
    Fail,
    PeerInfo,
    Push,
    Reply,
    WorldView,
    auth,
)
from collnet.membership.coordinator import Effect
from collnet.membership.liveness import Liveness
from collnet.transport.connection import FrameConnection
from collnet.transport.heartbeat import Heartbeat
from collnet.wire import Frame, FrameKind, Header
from collnet_daemon.control import CONTROL_LIMITS
from collnet_daemon.status import coordinator_status

log = logging.getLogger(__name__)

# Barriers peers may call: "state" carries a state manifest (as the frame's
# payload), "synced" a small report of the state reached (in the metadata).
BARRIERS = ("state", "synced")


class CoordinatorService:
    def __init__(
        self,
        liveness: Callable[[], Liveness] = Liveness,
        secret: bytes | None = None,
        rejoin_grace_s: float = 10.0,
    ) -> None:
        self.liveness = liveness
        self.secret = secret
        self.rejoin_grace_s = rejoin_grace_s
        self.state = CoordinatorState()
        self.conns: dict[str, FrameConnection] = {}
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrameConnection(_PeerSession(self), CONTROL_LIMITS, "peer"),
            host,
            port,
        )
        addr = self._server.sockets[0].getsockname()
        self.address = (str(addr[0]), int(addr[1]))
        log.info("coordinator listening on %s:%d", *self.address)
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns.values()):
            conn.close()

    def adopted(self) -> None:
        """A world was handed back by a rejoining member: give the others time."""
        log.info(
            "adopted epoch %d from a rejoining member; waiting %.1fs for the others",
            self.state.epoch,
            self.rejoin_grace_s,
        )
        asyncio.get_running_loop().call_later(self.rejoin_grace_s, self._expire_unconfirmed)

    def _expire_unconfirmed(self) -> None:
        if self.state.unconfirmed:
            log.warning("members never reconnected: %s", sorted(self.state.unconfirmed))
        self.perform(self.state.expire_unconfirmed())

    def perform(self, effects: list[Effect]) -> None:
        for eff in effects:
            conn = self.conns.get(eff.peer)
            if conn is None or conn.closed:
                continue
            payload = b""
            if isinstance(eff, Reply):
                msg = {"t": "reply", "id": eff.request_id, "ok": True, "world": eff.world.to_wire()}
            elif isinstance(eff, Push):
                msg = {"t": "world", "world": eff.world.to_wire()}
            elif isinstance(eff, Fail):
                error = eff.error.to_wire()
                msg = {"t": "reply", "id": eff.request_id, "ok": False, "error": error}
            elif isinstance(eff, BarrierReply):
                msg = {"t": "reply", "id": eff.request_id, "ok": True, "epoch": self.state.epoch}
                # The members' payloads are opaque here (the coordinator never
                # interprets state): forwarded as one msgpack map of bytes.
                payload = msgpack.packb(eff.payloads, use_bin_type=True)
                if eff.name == "synced":
                    self.state.reported[eff.peer] = eff.payloads.get(eff.peer)
            with contextlib.suppress(CollnetError):
                conn.send(FrameKind.CONTROL, msg, payload)


class _PeerSession:
    """One peer's control connection."""

    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.peer_id: str | None = None
        self.heartbeat: Heartbeat | None = None
        self.responder: auth.Responder | None = None
        self.authenticated = False

    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        # Only a registered peer's barrier request carries a payload; anything
        # else (a stranger before the handshake above all) may not make us buffer.
        if not self.authenticated or self.peer_id is None or header.kind != FrameKind.CONTROL:
            raise ProtocolError(f"unexpected payload on a {header.kind.name} control frame")
        return None

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        if not self.authenticated:
            self._handshake(conn, frame)
            return
        if frame.kind == FrameKind.HEARTBEAT:
            if self.heartbeat is not None:
                self.heartbeat.on_frame(frame.meta)
            elif isinstance(frame.meta, dict) and isinstance(frame.meta.get("ping"), int):
                conn.send(FrameKind.HEARTBEAT, {"pong": frame.meta["ping"]})
            return
        meta = frame.meta
        if frame.kind != FrameKind.CONTROL or not isinstance(meta, dict):
            raise ProtocolError(f"unexpected {frame.kind.name} frame on a control connection")
        rid = meta.get("id")
        if not isinstance(rid, int):
            raise ProtocolError("control request without an integer id")
        try:
            result = self._handle(conn, meta, rid, frame.payload)
        except ProtocolError:
            raise
        except CollnetError as exc:
            conn.send(
                FrameKind.CONTROL, {"t": "reply", "id": rid, "ok": False, "error": exc.to_wire()}
            )
            return
        if result is not None:
            conn.send(FrameKind.CONTROL, {"t": "reply", "id": rid, "ok": True, **result})

    def _handshake(self, conn: FrameConnection, frame: Frame) -> None:
        # An unauthenticated connection may send nothing but this handshake.
        if frame.kind != FrameKind.HELLO or not isinstance(frame.meta, dict):
            raise ProtocolError(f"expected HELLO, got {frame.kind.name}")
        who = f"peer at {conn.peername}"
        if self.responder is None:
            self.responder = auth.Responder(self.service.secret, (conn.peername or ("?",))[0])
            answer, self.authenticated = self.responder.on_hello(frame.meta, who)
            conn.send(FrameKind.HELLO, answer)
        else:
            self.responder.on_proof(frame.meta, who)
            self.authenticated = True

    def _handle(
        self, conn: FrameConnection, meta: dict[str, Any], rid: int, payload: memoryview
    ) -> dict[str, Any] | None:
        state = self.service.state
        t = meta.get("t")
        if t == "register":
            if self.peer_id is not None:
                raise ProtocolError("register sent twice")
            peer = PeerInfo.from_wire(meta.get("peer"))
            claimed = meta.get("world")
            adopting = not state.active
            if claimed is None:
                state.register(peer)
            else:
                member, effects = state.rejoin(peer, WorldView.from_wire(claimed))
                if member:
                    log.info("peer %s rejoined at epoch %d", peer.id, state.epoch)
                    if adopting:
                        self.service.adopted()
                self.service.perform(effects)
            self.peer_id = peer.id
            self.service.conns[peer.id] = conn
            conn.label = peer.id
            self.heartbeat = Heartbeat(
                lambda meta: conn.send(FrameKind.HEARTBEAT, meta),
                lambda: conn.bytes_received,
                lambda silent_s: self._silent(conn, silent_s),
                self.service.liveness(),
            )
            self.heartbeat.start()
            if peer.id in state.pending:
                log.info("peer %s registered (data %s:%d), pending", peer.id, peer.host, peer.port)
            return {"world": state.world().to_wire()}
        if t == "status":  # for operators (`collnet status`): needs no registration
            return {"status": coordinator_status(self.service)}
        if self.peer_id is None:
            raise ProtocolError(f"{t!r} before register")
        if t == "update_topology":
            epoch = meta.get("epoch", 0)
            if not isinstance(epoch, int):
                raise ProtocolError("update_topology epoch must be an integer")
            before = state.epoch
            self.service.perform(state.request_update(self.peer_id, rid, epoch))
            if state.epoch != before:
                log.info("epoch %d: world %s", state.epoch, list(state.world().ids))
            return None
        if t == "barrier":
            name, epoch = meta.get("name"), meta.get("epoch")
            if name not in BARRIERS or not isinstance(epoch, int):
                raise ProtocolError(f"bad barrier request {name!r} at epoch {epoch!r:.20}")
            arrived = bytes(payload) if name == "state" else meta.get("report")
            self.service.perform(state.request_barrier(self.peer_id, rid, name, epoch, arrived))
            return None
        if t == "world":
            return {"world": state.world().to_wire()}
        if t == "leave":
            self._drop("left")
            return {}
        raise ProtocolError(f"unknown control message {t!r}")

    def _silent(self, conn: FrameConnection, silent_s: float) -> None:
        # A frozen or cut-off peer: no socket error will ever come, so end it here.
        self._drop(f"silent for {silent_s:.1f}s (heartbeat timeout)")
        conn.abort()

    def _drop(self, why: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.peer_id is None:
            return
        peer, self.peer_id = self.peer_id, None
        self.service.conns.pop(peer, None)
        state = self.service.state
        before = state.epoch
        self.service.perform(state.lost(peer))
        log.info("peer %s %s; epoch %d -> %d", peer, why, before, state.epoch)

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        self._drop(f"lost ({exc.message})")
