"""The coordinator service: membership over TCP, no tensor data.

A thin asyncio shell around ``collnet.membership.CoordinatorState``: each
control connection is one peer; requests (parsed once, into the types of
``collnet.wire.control``) become state-machine events and the returned
effects become replies and pushes. A closed control connection is a lost
peer. The service also answers ``status`` (``CoordinatorService.status``):
the view ``collnet status`` prints and the coordinator's metrics read.

What a stranger can make it hold is bounded (``collnet.transport.admission``):
a connection must register within ``handshake_timeout_s`` (a status query is
answered meanwhile), and at most ``max_connections`` are open, fewer when the
process's file-descriptor limit would run out first. A request that breaks the
protocol (a world claimed out of bounds, say) is answered with its typed error
and closes only its own connection; the state is untouched.

With ``ring_order="planned"`` the state machine orders the world by
``RingPlanner`` over the link figures: measured ones (``links``), or those of
a ``--link-matrix-file`` (``collnet_daemon.linkfile``) when one is given;
``"join"`` keeps the join order (what a bench compares against).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, assert_never

from collnet.errors import AuthError, CollnetError, ProtocolError
from collnet.membership import (
    BarrierReply,
    CoordinatorState,
    Fail,
    PeerInfo,
    Push,
    Reply,
    auth,
    identity,
)
from collnet.membership.coordinator import Effect
from collnet.membership.liveness import Liveness
from collnet.topology.matrix import LinkMatrix
from collnet.topology.ringorder import RingPlanner
from collnet.transport.admission import Admission, fd_bounded
from collnet.transport.connection import FrameConnection
from collnet.transport.heartbeat import Heartbeat
from collnet.transport.loglimit import REMOTE, host_of
from collnet.transport.tls import Listening, Tls, peer_name
from collnet.transport.tls import serve as tls_serve
from collnet.wire import Frame, FrameKind, Header
from collnet.wire import control as wire
from collnet.wire.topology import LinkAck, LinkReport, TopologyStatus
from collnet_daemon.control import CONTROL_LIMITS
from collnet_daemon.linkfile import LinkFile
from collnet_daemon.reachability import ReachabilityChecks

log = logging.getLogger(__name__)


class CoordinatorService:
    def __init__(
        self,
        liveness: Callable[[], Liveness] = Liveness,
        secret: bytes | None = None,
        rejoin_grace_s: float = 10.0,
        max_connections: int = 1024,
        handshake_timeout_s: float = 10.0,
        tls: Tls | None = None,
        ring_order: str = "planned",
        link_matrix_file: str | None = None,
    ) -> None:
        self.liveness = liveness
        self.secret = secret
        # Mutual TLS: a registration must come from the certificate it names.
        self.tls = tls
        self.rejoin_grace_s = rejoin_grace_s
        self.admission = Admission(
            "registration", handshake_timeout_s, _registered, fd_bounded(max_connections)
        )
        # Link figures the ring order is planned on: measured, or from a file.
        self.links = LinkMatrix()
        # Each registering peer's advertised data port, dialled (reachability.py).
        self.reachability = ReachabilityChecks(tls, min(5.0, handshake_timeout_s))
        self.link_file = LinkFile(link_matrix_file) if link_matrix_file else None
        planner = RingPlanner(self._bandwidth, self._rtt) if ring_order == "planned" else None
        self.state = CoordinatorState(planner=planner)
        self.conns: dict[str, FrameConnection] = {}
        self._server: Listening | None = None
        self.address: tuple[str, int] | None = None
        self._started_s = time.monotonic()

    def _figures(self) -> LinkMatrix:
        return self.link_file.matrix if self.link_file is not None else self.links

    def _bandwidth(self, src: str, dst: str) -> float | None:
        return self._figures().bandwidth(src, dst)

    def _rtt(self, src: str, dst: str) -> float | None:
        return self._figures().rtt(src, dst)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await tls_serve(
            self.admission.factory(
                lambda: FrameConnection(_PeerSession(self), CONTROL_LIMITS, "peer")
            ),
            host,
            port,
            self.tls,
            self.admission.handshake_timeout_s,
        )
        addr = self._server.sockets[0].getsockname()
        self.address = (str(addr[0]), int(addr[1]))
        log.info(
            "coordinator listening on %s:%d (at most %s connections, %.1fs to register)",
            *self.address,
            self.admission.max_connections,
            self.admission.handshake_timeout_s,
        )
        return self.address

    async def close(self) -> None:
        self.reachability.close()
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
            msg: wire.Reply | wire.WorldPush
            if isinstance(eff, Reply):
                msg = wire.Reply(eff.request_id, wire.WorldAnswer(eff.world))
            elif isinstance(eff, Push):
                msg = wire.WorldPush(eff.world)
            elif isinstance(eff, Fail):
                msg = wire.Reply(eff.request_id, wire.ErrorInfo.of(eff.error))
            elif isinstance(eff, BarrierReply):
                # The members' payloads are opaque here (the coordinator never
                # interprets state): forwarded as one msgpack map.
                msg = wire.Reply(eff.request_id, wire.BarrierAnswer(self.state.epoch, eff.payloads))
                if eff.name == "synced":
                    self.state.reported[eff.peer] = eff.payloads.get(eff.peer)
            else:
                assert_never(eff)
            with contextlib.suppress(CollnetError):
                conn.send(FrameKind.CONTROL, msg.to_wire(), msg.payload)

    def status(self) -> wire.CoordinatorStatus:
        """The coordinator's view of the world: every registered peer with its state
        (``active`` in ring order, ``pending``, or ``unconfirmed`` after a restart),
        data address, control connection and its RTT, and what it reported at its
        last shared-state sync."""
        state = self.state
        rows: list[tuple[PeerInfo, wire.PeerState, int | None]]
        rows = [(p, "active", rank) for rank, p in enumerate(state.active)]
        rows += [(p, "pending", None) for p in state.pending.values()]
        peers = []
        for info, kind, rank in rows:
            conn = self.conns.get(info.id)
            session = conn.handler if conn is not None else None
            heartbeat = session.heartbeat if isinstance(session, _PeerSession) else None
            revision, digest, error = _reported(state.reported.get(info.id))
            peers.append(
                wire.PeerStatus(
                    info.id,
                    "unconfirmed" if info.id in state.unconfirmed else kind,
                    rank,
                    f"{info.host}:{info.port}",
                    conn is not None and not conn.closed,
                    None if heartbeat is None else heartbeat.liveness.srtt_s,
                    revision,
                    digest,
                    error,
                )
            )
        self.links.retain(self.link_members())
        return wire.CoordinatorStatus(
            state.epoch,
            state.world(),
            tuple(peers),
            ":".join(map(str, self.address or ("?", 0))),
            round(time.monotonic() - self._started_s, 3),
            TopologyStatus(self.links, self.reachability.rows(), time.monotonic()),
        )

    def link_members(self) -> set[str]:
        """The peers whose links the matrix may hold: active and pending."""
        return {p.id for p in self.state.active} | set(self.state.pending)


def coordinator_status(service: CoordinatorService) -> dict[str, Any]:
    """``service.status()`` as its msgpack-safe map (what metrics read)."""
    return service.status().to_wire()


def _registered(conn: FrameConnection) -> bool:
    """Past the handshake deadline: a connection that registered a peer."""
    return isinstance(conn.handler, _PeerSession) and conn.handler.peer_id is not None


def _request_id(meta: Any) -> int | None:
    rid = meta.get("id") if isinstance(meta, dict) else None
    return rid if type(rid) is int and rid >= 0 else None


def _reported(report: Any) -> tuple[int | None, str | None, str | None]:
    """(revision, state digest, sync error kind) from what a peer reported at its last
    "synced" barrier: opaque to the coordinator, so only what has the right type."""
    if not isinstance(report, dict):
        return None, None, None
    revision = report.get("revision")
    digest = report.get("digest")
    error = report.get("error")
    kind = error.get("kind", "error") if isinstance(error, dict) else "error"
    return (
        revision if type(revision) is int and revision >= 0 else None,
        digest.hex() if isinstance(digest, bytes) else digest if isinstance(digest, str) else None,
        (kind if isinstance(kind, str) else "error") if "error" in report else None,
    )


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
        if conn.closed:  # refused: the rest of what it sent goes unread
            return
        if not self.authenticated:
            self._handshake(conn, frame)
            return
        if frame.kind == FrameKind.HEARTBEAT:
            if self.heartbeat is not None:
                self.heartbeat.on_frame(frame.meta)
            elif isinstance(frame.meta, dict) and isinstance(frame.meta.get("ping"), int):
                conn.send(FrameKind.HEARTBEAT, {"pong": frame.meta["ping"]})
            return
        if frame.kind != FrameKind.CONTROL:
            raise ProtocolError(f"unexpected {frame.kind.name} frame on a control connection")
        try:
            request = wire.Request.from_wire(frame.meta, frame.payload)
            answer = self._handle(conn, request)
        except ProtocolError as exc:
            self._refuse(conn, _request_id(frame.meta), exc)
            return
        except CollnetError as exc:
            refusal = wire.Reply(request.id, wire.ErrorInfo.of(exc))
            conn.send(FrameKind.CONTROL, refusal.to_wire())
            return
        if answer is not None:
            reply = wire.Reply(request.id, answer)
            conn.send(FrameKind.CONTROL, reply.to_wire(), reply.payload)

    def _refuse(self, conn: FrameConnection, rid: int | None, exc: ProtocolError) -> None:
        """A request that breaks the protocol: its typed error as the reply, a log
        line, and this connection closed (a registered peer is lost with it);
        nothing else changes."""
        who = f"peer {self.peer_id!r}" if self.peer_id is not None else "connection"
        REMOTE.warning(
            log, host_of(conn.peername), "%s from %s: %s: %s; closing it",
            who, conn.peername, exc.kind, exc.message,
        )  # fmt: skip
        if rid is not None:
            refusal = wire.Reply(rid, wire.ErrorInfo.of(exc))
            with contextlib.suppress(CollnetError):
                conn.send(FrameKind.CONTROL, refusal.to_wire())
        conn.close()  # not abort: the refusal goes out first

    def _identity(self, conn: FrameConnection, claimed: PeerInfo) -> PeerInfo:
        """Who this connection is, decided here and nowhere else. With a shared
        secret (or none, on loopback) the handshake proves no name, so it is the
        peer it registered; a certified name (TLS) is checked against that here."""
        certified = peer_name(conn.transport)
        who = f"connection from {conn.peername}"
        try:
            identity.check_claim(certified, claimed.id, who)
            identity.check_peer_name(certified, who)
        except AuthError as exc:
            log.warning("%s: %s", exc.kind, exc.message)
            raise
        return claimed

    def _handshake(self, conn: FrameConnection, frame: Frame) -> None:
        # An unauthenticated connection may send nothing but this handshake.
        if frame.kind != FrameKind.HELLO or not isinstance(frame.meta, dict):
            raise ProtocolError(f"expected HELLO, got {frame.kind.name}")
        who = f"peer at {conn.peername}"
        if self.responder is None:
            self.responder = auth.Responder(
                self.service.secret,
                (conn.peername or ("?",))[0],
                peer_name(conn.transport) is not None,
            )
            answer, self.authenticated = self.responder.on_hello(frame.meta, who)
            conn.send(FrameKind.HELLO, answer)
        else:
            self.responder.on_proof(frame.meta, who)
            self.authenticated = True

    def _handle(self, conn: FrameConnection, request: wire.Request) -> wire.Answer | None:
        """Perform ``request``; its answer, or None when the state machine answers
        (later, through ``perform``)."""
        state = self.service.state
        body, rid = request.body, request.id
        if isinstance(body, wire.Register):
            if self.peer_id is not None:
                raise ProtocolError("register sent twice")
            peer = self._identity(conn, body.peer)
            adopting = not state.active
            if body.world is None:
                state.register(peer)
            else:
                member, effects = state.rejoin(peer, body.world)
                if member:
                    log.info("peer %r rejoined at epoch %d", peer.id, state.epoch)
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
            self.service.reachability.check(peer)
            if peer.id in state.pending:
                log.info("peer %r registered (data %s:%d), pending", peer.id, peer.host, peer.port)
            return wire.WorldAnswer(state.world())
        if isinstance(body, wire.GetStatus):  # for operators: needs no registration
            return wire.StatusAnswer(self.service.status())
        if self.peer_id is None:
            raise ProtocolError(f"{body.T!r} before register")
        if isinstance(body, wire.UpdateTopology):
            if self.service.link_file is not None:
                self.service.link_file.refresh()
            before = state.epoch
            self.service.perform(state.request_update(self.peer_id, rid, body.epoch))
            if state.epoch != before:
                log.info("epoch %d: world %s", state.epoch, list(state.world().ids))
            return None
        if isinstance(body, wire.Barrier):
            self.service.perform(
                state.request_barrier(self.peer_id, rid, body.name, body.epoch, body.arrived)
            )
            return None
        if isinstance(body, wire.GetWorld):
            return wire.WorldAnswer(state.world())
        if isinstance(body, LinkReport):
            members = self.service.link_members()
            self.service.links.retain(members)
            self.service.links.report(self.peer_id, body.links, time.monotonic(), members)
            verdict = self.service.reachability.verdict(self.peer_id)
            return LinkAck() if verdict is None else LinkAck(verdict.reachable, verdict.error)
        if isinstance(body, wire.Leave):
            self._drop("left")
            return wire.Left()
        assert_never(body)

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
        self.service.reachability.forget(peer)
        state = self.service.state
        before = state.epoch
        self.service.perform(state.lost(peer))
        self.service.links.retain(self.service.link_members())
        log.info("peer %r %s; epoch %d -> %d", peer, why, before, state.epoch)

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        self._drop(f"lost ({exc.message})")
