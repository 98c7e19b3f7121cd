"""The daemon's side of the coordinator: the control connection and its upkeep.

Control messages are CONTROL frames whose meta is a msgpack map with a type
``t``; their typed home is ``collnet.wire.control`` (requests answered by
replies carrying the request's ``id``, and the coordinator's ``WorldPush``
when the world changes under a member). The coordinator never sees tensor
data.

``CoordinatorClient`` is one control connection: handshake, heartbeats, and
requests matched to their replies. ``ControlPlane`` is what the daemon holds:
one registered connection at a time, re-established for as long as the daemon
runs. Failure model: collectives need no coordinator, so losing it fails
nothing by itself; the daemon reconnects (0.2 s, doubling to 2 s between
tries) and registers again, reporting the world it holds if it is a member,
which is how a restarted coordinator (soft state) gets the world back.
Meanwhile ``update_topology`` waits, bounded, for the reconnect and asks
again; a barrier asks again once ``check`` says its world still stands; a
plain request fails with ``DaemonUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collnet.errors import AuthError, CollnetError, DaemonUnavailable, PeerLost, ProtocolError
from collnet.membership import PeerInfo, WorldView, auth, identity
from collnet.membership.liveness import Liveness
from collnet.transport.connection import FrameConnection
from collnet.transport.heartbeat import Heartbeat
from collnet.transport.tls import Tls, peer_name
from collnet.transport.tls import connect as tls_connect
from collnet.wire import Frame, FrameKind, Header, Limits
from collnet.wire import control as wire
from collnet.wire.topology import LinkAck, LinkReport
from collnet_daemon.config import DaemonConfig
from collnet_daemon.tasks import TaskSet, quiet

log = logging.getLogger(__name__)

# Control frames may carry a payload (state manifests, and the coordinator's
# answer holding every member's): bounded, far below anything a data link takes.
MAX_CONTROL_PAYLOAD = 64 << 20
CONTROL_LIMITS = Limits(max_payload_bytes=MAX_CONTROL_PAYLOAD)


@dataclass
class _Call:
    """A request in flight: what its reply resolves, and how to read its answer."""

    future: asyncio.Future[wire.Answer | wire.ErrorInfo]
    answer: type[wire.Answer]


class CoordinatorClient:
    """RPC over one control connection; see the module docstring."""

    def __init__(
        self,
        on_world: Callable[[WorldView], None],
        liveness: Callable[[], Liveness] = Liveness,
        secret: bytes | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.on_world = on_world
        self.liveness = liveness
        self._initiator = auth.Initiator(secret)
        self.tls = tls
        self._answered: asyncio.Future[None] | None = None
        self.conn: FrameConnection | None = None
        self.lost: asyncio.Future[CollnetError] | None = None
        self._pending: dict[int, _Call] = {}
        self._next_id = 1
        self._heartbeat: Heartbeat | None = None

    async def connect(self, host: str, port: int, timeout_s: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        self.lost = loop.create_future()
        try:
            _, made = await asyncio.wait_for(
                tls_connect(
                    lambda: FrameConnection(self, CONTROL_LIMITS, "coordinator"),
                    host,
                    port,
                    self.tls,
                    timeout_s,
                ),
                timeout_s,
            )
        except AuthError as exc:
            log.error("TLS with the coordinator %s:%d failed: %s", host, port, exc)
            raise
        except (OSError, TimeoutError) as exc:
            raise DaemonUnavailable(f"cannot reach coordinator {host}:{port}: {exc}") from None
        assert isinstance(made, FrameConnection)
        self.conn = conn = made
        try:
            # With TLS, only the holder of the certificate named "coordinator" is one.
            certified = peer_name(conn.transport)
            if self.tls is not None:
                identity.check_claim(certified, identity.COORDINATOR, f"{host}:{port}")
        except AuthError as exc:
            log.error("refusing the coordinator at %s:%d: %s", host, port, exc)
            conn.abort()
            raise
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
        self, request: wire.RequestBody, answer: type[wire.A], timeout_s: float | None = None
    ) -> wire.A:
        """One request and its answer (of type ``answer``); an error reply is raised."""
        conn = self.conn
        if conn is None or not self.connected:
            raise DaemonUnavailable("not connected to the coordinator")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[wire.Answer | wire.ErrorInfo]
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Call(fut, answer)
        msg = wire.Request(rid, request)
        conn.send(FrameKind.CONTROL, msg.to_wire(), msg.payload)
        try:
            outcome = await asyncio.wait_for(fut, timeout_s)
        finally:
            self._pending.pop(rid, None)
        if isinstance(outcome, wire.ErrorInfo):
            raise outcome.exception()
        if not isinstance(outcome, answer):  # on_frame parsed it as one
            raise ProtocolError(f"expected {answer.__name__}, got {type(outcome).__name__}")
        return outcome

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

    def abandon(self, exc: CollnetError) -> None:
        """Fail every call in flight with ``exc``: the coordinator dropped them."""
        for call in self._pending.values():
            if not call.future.done():
                call.future.set_exception(exc)

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
        if frame.kind != FrameKind.CONTROL:
            raise ProtocolError(f"unexpected {frame.kind.name} from the coordinator")
        t = wire.message_type(frame.meta, "control message from the coordinator")
        if t == wire.WorldPush.T:
            self.on_world(wire.WorldPush.from_wire(frame.meta, frame.payload).world)
            return
        if t != wire.Reply.T:
            raise ProtocolError(f"unknown control message {t!r}")
        call = self._pending.get(wire.Reply.id_of(frame.meta))
        if call is None or call.future.done():
            return  # its caller gave up on it
        try:
            reply = wire.Reply.from_wire(frame.meta, frame.payload, call.answer)
        except ProtocolError as exc:
            # A malformed answer fails its request; the connection itself is sound.
            call.future.set_exception(exc)
            return
        call.future.set_result(reply.outcome)

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._answered is not None and not self._answered.done():
            self._answered.set_exception(exc)
        err = DaemonUnavailable(f"lost the coordinator: {exc.message}")
        for call in self._pending.values():
            if not call.future.done():
                call.future.set_exception(err)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(err)


class ControlPlane:
    """This daemon's side of the coordinator: one registered connection, re-established
    until the daemon stops (see the module docstring for the failure model).

    ``held()`` is the world this daemon holds now: a member reports it when it
    registers again, and ``update_topology`` names its epoch. ``on_world`` gets
    the world of every registration and of every push. ``on_refused`` is told
    (once, and reconnecting stops) when the coordinator refuses that world with
    a ``ProtocolError``: it will never take it back, and this daemon cannot join
    the coordinator's world while holding it (worlds only move forward here).
    Registered only while the node has a session (``end_session`` when its
    trainers are gone, ``begin_session`` when one joins): idle, it stays
    connected unregistered, asks only for the status, and never reconnects.
    """

    def __init__(
        self,
        config: DaemonConfig,
        held: Callable[[], WorldView],
        on_world: Callable[[WorldView], None],
        on_refused: Callable[[ProtocolError], None] | None = None,
    ) -> None:
        self.config = config
        self.id = config.peer_id
        self._held = held
        self._on_world = on_world
        self._on_refused = on_refused
        self._me: PeerInfo | None = None
        # The registered connection (replaced only by a successful registration).
        self._client = CoordinatorClient(self._pushed, config.liveness, config.secret, config.tls)
        self._up = asyncio.Event()
        self._stopping = False
        self._topology_call: asyncio.Future[wire.WorldAnswer] | None = None
        self._tasks = TaskSet(self._reconnect_failed)
        # This node's session (collnet.membership.session): registered on behalf of
        # its trainers; False from ``end_session`` until ``begin_session``.
        self._in_session = True
        self._session_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------
    async def start(self, me: PeerInfo) -> WorldView:
        """Connect, authenticate and register as ``me``; raises if that fails.
        The registered world is also passed to ``on_world``."""
        self._me = me
        return await self._join()

    def stop_reconnecting(self) -> None:
        """The daemon is stopping: a lost coordinator stays lost, and calls it cut
        off fail at once instead of waiting for a reconnect. ``leave`` still works."""
        self._stopping = True

    def close(self) -> None:
        self._stopping = True
        self._tasks.cancel()
        self._client.close()

    @property
    def connected(self) -> bool:
        """Registered, and that connection alive."""
        return self._up.is_set() and self._client.connected

    @property
    def rtt_s(self) -> float | None:
        """Smoothed heartbeat RTT to the coordinator (None before the first pong)."""
        return self._client.rtt_s

    async def wait_connected(self) -> None:
        """Until this daemon is connected to the coordinator again (unbounded: the
        caller bounds it)."""
        while not (self._up.is_set() and self._client.connected):
            if self._up.is_set():
                # The loss is known to the connection but not handled here yet.
                await asyncio.sleep(0.02)
            else:
                await self._up.wait()

    async def _join(self) -> WorldView:
        """Connect, authenticate and register; a member reports the world it holds,
        which is how a restarted coordinator (soft state) gets the world back."""
        assert self._me is not None, "start() first"
        client = CoordinatorClient(
            self._pushed, self.config.liveness, self.config.secret, self.config.tls
        )
        await client.connect(*self.config.coordinator)
        held = self._held()
        register = wire.Register(self._me, held if self.id in held.ids else None)
        try:
            answer = await client.call(
                register, wire.WorldAnswer, timeout_s=self.config.connect_timeout_s
            )
        except ProtocolError as exc:
            client.close()
            if register.world is not None and self._on_refused is not None:
                self._stopping = True  # asking again would be refused again
                self._on_refused(exc)
            raise
        except BaseException:
            client.close()
            raise
        self._client = client
        self._on_world(answer.world)
        self._up.set()
        assert client.lost is not None
        client.lost.add_done_callback(lambda f: self._lost(client, f.result()))
        return answer.world

    def _pushed(self, world: WorldView) -> None:
        log.info("daemon %s: epoch %d, world %s", self.id, world.epoch, list(world.ids))
        self._on_world(world)

    def _lost(self, client: CoordinatorClient, exc: CollnetError) -> None:
        if client is not self._client:
            return  # a connection a new session replaced
        self._up.clear()
        if not self._stopping and not self._in_session:
            log.info("daemon %s: %s; no trainer here, so no reconnect yet", self.id, exc.message)
        elif not self._stopping:
            # Collectives need no coordinator: keep serving them, and reconnect.
            log.warning("daemon %s: %s; reconnecting", self.id, exc.message)
            self._tasks.spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay_s = 0.2
        while not self._stopping:
            await asyncio.sleep(delay_s)
            # Never while a session ends or begins: each registers (or not) itself.
            async with self._session_lock:
                if self._stopping or not self._in_session or self.connected:
                    return
                try:
                    await self._join()
                except (CollnetError, OSError, TimeoutError) as exc:
                    log.debug("daemon %s: coordinator still unreachable: %s", self.id, exc)
                    delay_s = min(2.0, delay_s * 2)
                    continue
            log.info(
                "daemon %s: reconnected to the coordinator (epoch %d)", self.id, self._held().epoch
            )
            return

    def _reconnect_failed(self, exc: BaseException) -> None:
        log.warning("daemon %s: background task failed: %s", self.id, exc)

    # -- requests ----------------------------------------------------------
    async def world(self, timeout_s: float) -> WorldView:
        """The coordinator's current world, pending peers included."""
        if not self._in_session:
            # Unregistered, this daemon may ask only what anyone may: the status.
            if not self.connected:
                return self._held()
            status = await self._client.call(wire.GetStatus(), wire.StatusAnswer, timeout_s)
            return status.status.world
        answer = await self._client.call(wire.GetWorld(), wire.WorldAnswer, timeout_s)
        return answer.world

    async def update_topology(self, timeout_s: float) -> WorldView:
        """The membership barrier: the world it agreed on. Concurrent callers share
        one call. A daemon that lost the coordinator (a network cut, a coordinator
        restart) reconnects by itself: the barrier waits up to ``timeout_s`` for
        that, rather than failing a trainer whose daemon is fine, and asks again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if not self.connected:
                left = deadline - loop.time()
                try:
                    await asyncio.wait_for(self.wait_connected(), max(0.0, left))
                except TimeoutError:
                    raise DaemonUnavailable(
                        f"daemon {self.id}: no coordinator for {timeout_s:.0f}s"
                    ) from None
            if self._topology_call is None or self._topology_call.done():
                self._topology_call = asyncio.ensure_future(
                    self._client.call(wire.UpdateTopology(self._held().epoch), wire.WorldAnswer)
                )
                self._topology_call.add_done_callback(quiet)  # its waiters re-raise it
            try:
                answer = await asyncio.shield(self._topology_call)
            except DaemonUnavailable:
                if self._stopping or self.connected:
                    raise
                continue  # the coordinator went away mid-call: again once reconnected
            return answer.world

    async def barrier(
        self,
        name: str,
        epoch: int,
        arrived: bytes | dict[str, Any],
        check: Callable[[], None],
    ) -> dict[str, bytes | dict[str, Any]]:
        """Arrive at barrier ``name`` of ``epoch`` (see ``wire.Barrier``); what every
        member arrived with, by peer id, decoded from the answer's msgpack payload.

        Unbounded (the caller bounds it). If the coordinator goes away (restarted,
        or this daemon was cut off), then once reconnected ``check()`` runs, which
        raises if the world changed under the caller (this peer may have been
        dropped); if it does not, the same barrier is called again."""
        request = wire.Barrier(name, epoch, arrived)
        while True:
            try:
                answer = await self._client.call(request, wire.BarrierAnswer)
                return answer.payloads
            except DaemonUnavailable:
                if self._stopping:
                    raise
            await self.wait_connected()
            check()

    async def report_links(self, report: LinkReport, timeout_s: float) -> LinkAck:
        """Send this daemon's link estimates (registered only: linkreport.py)."""
        if not self._in_session:
            raise DaemonUnavailable(f"daemon {self.id} is not registered")
        return await self._client.call(report, LinkAck, timeout_s)

    async def leave(self, timeout_s: float) -> bool:
        """Announce a graceful leave; whether the coordinator took it (logged either way)."""
        return not self._in_session or await self._announce_leave(timeout_s)

    async def _announce_leave(self, timeout_s: float) -> bool:
        try:
            await self._client.call(wire.Leave(), wire.Left, timeout_s)
        except (CollnetError, TimeoutError) as exc:
            log.warning("daemon %s: could not announce leave: %s", self.id, exc)
            return False
        log.info("daemon %s: left the world", self.id)
        return True

    # -- sessions (collnet.membership.session) -----------------------------
    async def end_session(self, timeout_s: float) -> bool:
        """This node's trainers are gone: leave the world (or the pending list) at once
        and stay up, unregistered; no reconnect registers again until
        ``begin_session``. Whether the coordinator took the leave; if it did not,
        the connection is cut, which the coordinator takes for a lost peer."""
        async with self._session_lock:
            if not self._in_session:
                return False
            self._in_session = False
            client = self._client
            took = self.connected and await self._announce_leave(timeout_s)
            if not took:
                client.close()
            # The coordinator forgot this peer's calls in flight: nobody answers them.
            client.abandon(PeerLost(f"daemon {self.id} left: no trainer here", peer=self.id))
            return took

    async def begin_session(self) -> None:
        """A trainer joined after the session ended: register again, as pending, on a
        fresh connection (the idle one is closed)."""
        async with self._session_lock:
            if self._in_session:
                return
            idle, self._in_session = self._client, True
            try:
                await self._join()
            except BaseException:
                self._in_session = False
                raise
            if idle is not self._client:
                idle.close()
