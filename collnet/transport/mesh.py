"""Data links between daemons: listening, dialling and the link handshake.

Exactly one side dials each pair (the peer whose id sorts first), so two
peers that need each other at the same moment never build two links. The
dialler chooses the link's K (a fixed ``connections``, or with ``None``,
"auto", from the link's bandwidth-delay product: ``collnet.topology.striping``,
so a loopback link gets one stream and a long fat one several; with no
estimate of the link yet, from the round trip its first connection timed:
``collnet.transport.tcpinfo``), opens K connections and sends
``HELLO {peer, conn, k, nonce}`` on each (any K the wire allows is
accepted, so peers configured differently still link; a link keeps its K
until it is made again, sized then from what the previous link measured: a
stripe does not grow while collectives stream over it). The
acceptor answers ``HELLO {peer, nonce, proof}``; the dialler checks the proof
and answers ``HELLO {proof}`` (see ``collnet.membership.auth``), and only
then does the acceptor attach the connection to its link for that peer.
With no shared secret configured, nonces and proofs are left out and only
loopback peers are accepted. A connection whose frames are not this handshake
is closed; it can send nothing else before it completes.

With TLS (``collnet.transport.tls``) every connection carries a certified
identity, and the HELLO is checked against it: the dialler's claimed ``peer``
must be its certificate's name, the acceptor's certificate must name the peer
that was dialled, and the dialler must be a member of the world this daemon
holds (active or pending). A dialler not (yet) in that world is not answered
at once: a member admitted a moment ago may dial before this daemon has
applied the world that admits it, so the HELLO waits (``Mesh.world_changed``)
until the connect deadline, and is then refused (``AuthError``). Without TLS
an id is only a claim, so no membership check is made on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from collnet.errors import AuthError, CollnetError, PeerLost, ProtocolError
from collnet.membership import auth, identity
from collnet.membership.liveness import Liveness
from collnet.topology.striping import (
    LinkFigures,
    connections_after,
    connections_for,
)
from collnet.transport.admission import Admission, fd_bounded
from collnet.transport.connection import FrameConnection
from collnet.transport.link import LinkRouter, PeerLink
from collnet.transport.loglimit import REMOTE, host_of
from collnet.transport.sockbuf import kernel_caps
from collnet.transport.tcpinfo import smoothed_rtt_s
from collnet.transport.tls import Listening, Tls, peer_name
from collnet.transport.tls import connect as tls_connect
from collnet.transport.tls import serve as tls_serve
from collnet.wire import Frame, FrameKind, Header, Limits

log = logging.getLogger(__name__)

# Data connections a daemon's port holds at once (K per linked peer), lowered to
# the descriptor limit; at the cap a half-open newcomer displaces an old one.
MAX_DATA_CONNECTIONS = 8192
# Peers whose last link's figures are kept for sizing their next link.
MAX_REMEMBERED_LINKS = 1024
# Connections one link may stripe over: a HELLO saying more is refused (the
# acceptor takes the dialler's K, so this bounds what a dialler makes it hold).
MAX_LINK_CONNECTIONS = 64


def _hello_fields(meta: Any) -> tuple[str, int, int]:
    if not isinstance(meta, dict):
        raise ProtocolError("HELLO metadata must be a map")
    peer, index, k = meta.get("peer"), meta.get("conn", 0), meta.get("k", 1)
    if not isinstance(peer, str) or not peer or len(peer) > 128:
        raise ProtocolError(f"HELLO has a bad peer id {peer!r}")
    if (
        not isinstance(index, int)
        or not isinstance(k, int)
        or not 0 <= index < k <= MAX_LINK_CONNECTIONS
    ):
        raise ProtocolError(f"HELLO has bad connection index {index!r} of {k!r}")
    return peer, index, k


class _Handshake:
    """Handler of a connection until its handshake is complete.

    Dialling side: sends HELLO, checks the acceptor's answer (and its proof of
    the shared secret), sends its own proof, then the link is usable. Accepting
    side: answers the HELLO and attaches the connection once the dialler has
    proven the secret (or at once, for loopback peers when no secret is set).
    """

    def __init__(
        self,
        mesh: Mesh,
        dialled: asyncio.Future[None] | None = None,
        slot: tuple[PeerLink, int] | None = None,
    ) -> None:
        self.mesh = mesh
        self.dialled = dialled
        self.slot = slot
        self.initiator = auth.Initiator(mesh.secret) if dialled is not None else None
        self.responder: auth.Responder | None = None
        self.hello: tuple[str, int, int] | None = None
        # A certified dialler not in this daemon's world yet: its first HELLO,
        # answered once a world admits it (see the module docstring).
        self.parked: tuple[FrameConnection, Any] | None = None

    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        raise ProtocolError(f"{header.kind.name} frame with payload before handshake")

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        if frame.kind != FrameKind.HELLO:
            raise ProtocolError(f"expected HELLO, got {frame.kind.name}")
        if self.initiator is not None:  # the acceptor's answer
            if self.slot is not None:
                expected = self.slot[0].peer
                identity.check_claim(
                    peer_name(conn.transport), expected, f"peer at {conn.peername}"
                )
            final, verdict = self.initiator.on_answer(frame.meta, f"peer at {conn.peername}")
            if final is not None:
                conn.send(FrameKind.HELLO, final)
            if verdict is not None:
                raise verdict
            if self.slot is not None:
                # Attach now, in this callback: the acceptor may already have sent
                # DATA behind its answer, and it must reach the link, not this
                # handshake handler.
                self.slot[0].attach(self.slot[1], conn)
            if self.dialled is not None and not self.dialled.done():
                self.dialled.set_result(None)
            return
        if self.hello is None and self.parked is None:
            if isinstance(frame.meta, dict) and frame.meta.get("probe") is True:
                # A reachability check (the coordinator's, on a join): say who
                # listens here and hang up; no link, nothing held.
                conn.send(FrameKind.HELLO, {"peer": self.mesh.self_id})
                conn.close()
                return
            hello = _hello_fields(frame.meta)
            certified = peer_name(conn.transport)
            who = f"peer {hello[0]!r} from {conn.peername}"
            identity.check_claim(certified, hello[0], who)
            identity.check_peer_name(certified, who)
            if certified is not None and not self.mesh.admits(hello[0]):
                REMOTE.info(
                    log, certified, "%s is not in this daemon's world yet: HELLO waits", who
                )
                self.parked = (conn, frame.meta)
                self.mesh._parked.add(self)
                return
            self._answer(conn, frame.meta)
            return
        if self.hello is None or self.responder is None:
            raise ProtocolError("a second HELLO before the first was answered")
        self.responder.on_proof(frame.meta, f"peer {self.hello[0]!r} from {conn.peername}")
        self.mesh._accept(*self.hello, conn, proven=True)

    def _answer(self, conn: FrameConnection, meta: Any) -> None:
        """Answer the dialler's first HELLO (attaching at once if no proof follows)."""
        self.parked = None
        self.hello = _hello_fields(meta)
        certified = peer_name(conn.transport)
        self.responder = auth.Responder(
            self.mesh.secret, (conn.peername or ("?",))[0], certified is not None
        )
        who = f"peer {self.hello[0]!r} from {conn.peername}"
        answer, done = self.responder.on_hello(meta, who)
        conn.send(FrameKind.HELLO, {"peer": self.mesh.self_id, **answer})
        if done:
            self.mesh._accept(*self.hello, conn, proven=certified is not None)

    def admit_if_member(self) -> None:
        """The world changed: answer a parked HELLO if its peer is in it now."""
        if self.parked is None:
            return
        conn, meta = self.parked
        if conn.closed:
            self.mesh._parked.discard(self)
        elif self.mesh.admits(meta["peer"]):
            self.mesh._parked.discard(self)
            try:
                self._answer(conn, meta)
            except CollnetError as exc:
                REMOTE.warning(
                    log,
                    host_of(conn.peername),
                    "connection %s: %s: %s",
                    conn.peername,
                    exc.kind,
                    exc,
                )
                conn.abort()

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        if self.parked is not None:
            self.mesh._parked.discard(self)
            refused = AuthError(
                f"peer {self.parked[1]['peer']!r} from {conn.peername} is not a member of "
                "the world this daemon holds: data link refused"
            )
            REMOTE.warning(log, self.parked[1]["peer"], "%s: %s", refused.kind, refused)
            self.parked = None
        if self.dialled is not None and not self.dialled.done():
            self.dialled.set_exception(exc)


class Mesh:
    """This daemon's data links, keyed by peer id."""

    def __init__(
        self,
        self_id: str,
        connections: int | None,
        router: LinkRouter,
        limits: Limits | None = None,
        connect_timeout_s: float = 10.0,
        liveness: Callable[[], Liveness] = Liveness,
        secret: bytes | None = None,
        on_new_link: Callable[[PeerLink], None] | None = None,
        tls: Tls | None = None,
        members: Callable[[], set[str]] | None = None,
        max_connections: int = MAX_DATA_CONNECTIONS,
        estimate: Callable[[str], LinkFigures | None] | None = None,
    ) -> None:
        self.self_id = self_id
        self.max_connections = max_connections
        # A fixed K for every link this daemon dials, or None: per link ("auto").
        self.k = connections
        # The link estimates "auto" follows (bandwidth and RTT to a peer, if known).
        self.estimate = estimate
        self.window_bytes = socket_window_bytes()
        self.router = router
        self.limits = limits or Limits()
        self.connect_timeout_s = connect_timeout_s
        self.liveness = liveness
        self.secret = secret
        self.tls = tls
        # The ids allowed to open data links (the world held: active and pending);
        # checked only for certified identities (see the module docstring).
        self._members = members
        self._parked: set[_Handshake] = set()
        self.links: dict[str, PeerLink] = {}
        # Told of every link as it is made (metrics count its bytes after it is gone).
        self.on_new_link = on_new_link
        self._dialling: dict[str, asyncio.Task[PeerLink]] = {}
        # Links this daemon waits for a peer to dial (the peer's first connection
        # makes the link, with the K the peer chose).
        self._awaited: dict[str, asyncio.Future[PeerLink]] = {}
        # What each peer's last link measured, and its K: the next link's size.
        self._measured: dict[str, tuple[LinkFigures, int]] = {}
        self._server: Listening | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        # A connection that never completes its HELLO must not hold a socket forever.
        admission = Admission(
            "HELLO",
            self.connect_timeout_s,
            lambda conn: not isinstance(conn.handler, _Handshake),
            fd_bounded(self.max_connections),
        )
        accepted = admission.factory(
            lambda: FrameConnection(_Handshake(self), self.limits, "accepting")
        )
        self._server = await tls_serve(accepted, host, port, self.tls, self.connect_timeout_s)
        sock = self._server.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def admits(self, peer: str) -> bool:
        return self._members is None or peer in self._members()

    def world_changed(self) -> None:
        """Answer the parked HELLOs of peers the world now admits."""
        for handshake in list(self._parked):
            handshake.admit_if_member()

    def connections_to(self, peer: str, host: str, rtt_s: float | None = None) -> int:
        """The K this daemon dials ``peer`` at ``host`` with, on a path whose
        round trip was timed at ``rtt_s`` (if known)."""
        if self.k is not None:
            return self.k
        estimate = self.estimate(peer) if self.estimate is not None else None
        if estimate is None and peer in self._measured:
            measured, k_before = self._measured[peer]
            return connections_after(measured, k_before, self.window_bytes)
        return connections_for(estimate, host, self.window_bytes, rtt_s=rtt_s)

    def _remember(self, link: PeerLink) -> None:
        """Keep what a link that is going measured, for sizing the next one."""
        rtt_s = link.rtt.value(time.monotonic())
        rate = link.rx_meter.bytes_per_s
        if rtt_s is not None and rate is not None:
            self._measured.pop(link.peer, None)
            self._measured[link.peer] = (LinkFigures(rate * 8, rtt_s), link.k)
            # Ids anyone can claim must not grow it without bound: oldest out.
            while len(self._measured) > MAX_REMEMBERED_LINKS:
                del self._measured[next(iter(self._measured))]

    def _new_link(self, peer: str, k: int) -> PeerLink:
        old = self.links.get(peer)
        if old is not None:
            self._remember(old)
        link = self.links[peer] = PeerLink(peer, k, self.router, self.liveness())
        if self.on_new_link is not None:
            self.on_new_link(link)
        return link

    def link_if_ready(self, peer: str) -> PeerLink | None:
        link = self.links.get(peer)
        if link is not None and link.ready.is_set() and not link.failed:
            return link
        return None

    async def get_link(self, peer: str, addr: tuple[str, int]) -> PeerLink:
        """A ready link to ``peer``, dialling it or awaiting its dial."""
        link = self.link_if_ready(peer)
        if link is not None:
            return link
        if self.self_id < peer:
            task = self._dialling.get(peer)
            if task is None:
                task = asyncio.ensure_future(self._dial(peer, addr))
                self._dialling[peer] = task
                task.add_done_callback(partial(self._dial_done, peer))
            return await asyncio.shield(task)
        link = self.links.get(peer)
        if link is None or link.failed:
            # Its K is the dialler's: the link is made by the first connection.
            link = await asyncio.shield(self._dialled_by(peer))
        await link.wait_ready(self.connect_timeout_s)
        return link

    def _dialled_by(self, peer: str) -> asyncio.Future[PeerLink]:
        """The link ``peer`` is about to dial, once its first connection arrives;
        past the connect deadline the link is lost (the router learns it once)."""
        waiting = self._awaited.get(peer)
        if waiting is not None and not waiting.done():
            return waiting
        loop = asyncio.get_running_loop()
        waiting = self._awaited[peer] = loop.create_future()
        timer = loop.call_later(self.connect_timeout_s, self._not_dialled, peer, waiting)

        def settled(f: asyncio.Future[PeerLink]) -> None:
            timer.cancel()
            if not f.cancelled():
                f.exception()  # retrieved here; the awaiting callers re-raise it

        waiting.add_done_callback(settled)
        return waiting

    def _not_dialled(self, peer: str, waiting: asyncio.Future[PeerLink]) -> None:
        if waiting.done():
            return
        if self._awaited.get(peer) is waiting:
            del self._awaited[peer]
        exc = PeerLost(f"link to {peer} not ready within {self.connect_timeout_s:.1f}s", peer=peer)
        waiting.set_exception(exc)
        self.router.on_link_lost(peer, exc)

    def _dial_done(self, peer: str, task: asyncio.Task[PeerLink]) -> None:
        self._dialling.pop(peer, None)
        if not task.cancelled():
            task.exception()  # retrieved here; the awaiting caller re-raises it

    async def _dial(self, peer: str, addr: tuple[str, int]) -> PeerLink:
        loop = asyncio.get_running_loop()
        link = self._new_link(peer, self.connections_to(peer, addr[0]))
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                answers = []
                index = 0
                while index < link.k:
                    answer: asyncio.Future[None] = loop.create_future()
                    handshake = _Handshake(self, answer, (link, index))
                    _, made = await tls_connect(
                        lambda h=handshake: FrameConnection(h, self.limits, peer),  # type: ignore[misc]
                        addr[0],
                        addr[1],
                        self.tls,
                        self.connect_timeout_s,
                    )
                    assert isinstance(made, FrameConnection)
                    conn = made
                    link.hold(conn)
                    if link.error is not None:
                        raise link.error  # given up while this one connected
                    if index == 0:
                        # The first connection has timed the path: size the link
                        # before any HELLO says its K (striping.connections_for).
                        tr = conn.transport
                        rtt_s = smoothed_rtt_s(None if tr is None else tr.get_extra_info("socket"))
                        link.resize(self.connections_to(peer, addr[0], rtt_s))
                        link.dial_rtt_s = rtt_s
                        log.info(
                            "dialling %s at %s:%d with %d connection(s) (handshake RTT %s)",
                            peer,
                            *addr,
                            link.k,
                            "unknown" if rtt_s is None else f"{rtt_s * 1e3:.1f} ms",
                        )
                    assert handshake.initiator is not None
                    hello = {"peer": self.self_id, "conn": index, "k": link.k}
                    conn.send(FrameKind.HELLO, handshake.initiator.hello(hello))
                    # Retrieved here: only the first failure is awaited below.
                    answer.add_done_callback(lambda f: f.cancelled() or f.exception())
                    answers.append(answer)
                    index += 1
                for answer in answers:
                    await answer
                if link.error is not None:
                    raise link.error  # given up while its handshakes were open
        except (OSError, TimeoutError, CollnetError) as exc:
            why = str(exc) or f"no answer within {self.connect_timeout_s:.1f}s"
            err = PeerLost(f"cannot connect to {peer} at {addr[0]}:{addr[1]}: {why}", peer=peer)
            link.fail(err)
            raise err from None
        return link

    def _accept(
        self, peer: str, index: int, k: int, conn: FrameConnection, proven: bool = False
    ) -> None:
        """Attach an accepted connection; ``proven``: the dialler proved who it is
        (the shared secret, or a certificate naming it), not only claimed it."""
        link = self.links.get(peer)
        held = link is not None and not link.failed and link.conns[0] is not None
        if proven and index == 0 and link is not None and held:
            # A dialler sends connection 0 only to begin a link: it gave up the one
            # we hold, and its close never reached us (a NAT forgot the flow, a path
            # died silently). Proven, its new link wins, and what ran over the old
            # one fails at once instead of at its heartbeat deadline. A loopback
            # peer with no secret only claims its name: its duplicate is refused.
            REMOTE.warning(
                log, host_of(conn.peername), "link %s: replaced by the peer's new dial", peer
            )
            link.fail(PeerLost(f"link to {peer} replaced by its new dial", peer=peer))
            link = self.links.get(peer)
        if link is None or link.failed:
            link = self._new_link(peer, k)
        elif link.k != k:
            raise ProtocolError(f"{peer} announced {k} connections on a link of {link.k}")
        waiting = self._awaited.pop(peer, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(link)
        link.attach(index, conn)

    def drop(self, peer: str, reason: str = "dropped") -> None:
        waiting = self._awaited.pop(peer, None)
        if waiting is not None and not waiting.done():
            waiting.set_exception(PeerLost(f"link to {peer} {reason}", peer=peer))
        link = self.links.pop(peer, None)
        if link is not None:
            self._remember(link)
            link.fail(PeerLost(f"link to {peer} {reason}", peer=peer))

    async def close(self) -> None:
        for peer in list(self._awaited):
            self.drop(peer, "closed")
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def socket_window_bytes() -> int:
    """What one stream keeps in flight at most, with the buffers it gets."""
    return kernel_caps().window_bytes()
