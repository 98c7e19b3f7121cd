"""Data links between daemons: listening, dialling and the link handshake.

Exactly one side dials each pair (the peer whose id sorts first), so two
peers that need each other at the same moment never build two links. The
dialler opens K connections and sends ``HELLO {peer, conn, k, nonce}`` on
each; the acceptor answers ``HELLO {peer, nonce, proof}``; the dialler checks
the proof and answers ``HELLO {proof}`` (see ``collnet.membership.auth``), and
only then does the acceptor attach the connection to its link for that peer.
With no shared secret configured, nonces and proofs are left out and only
loopback peers are accepted. A connection whose frames are not this handshake
is closed; it can send nothing else before it completes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from collnet.errors import CollnetError, PeerLost, ProtocolError
from collnet.membership import auth
from collnet.membership.liveness import Liveness
from collnet.transport.admission import Admission
from collnet.transport.connection import FrameConnection
from collnet.transport.link import LinkRouter, PeerLink
from collnet.wire import Frame, FrameKind, Header, Limits

log = logging.getLogger(__name__)


def _hello_fields(meta: Any) -> tuple[str, int, int]:
    if not isinstance(meta, dict):
        raise ProtocolError("HELLO metadata must be a map")
    peer, index, k = meta.get("peer"), meta.get("conn", 0), meta.get("k", 1)
    if not isinstance(peer, str) or not peer or len(peer) > 128:
        raise ProtocolError(f"HELLO has a bad peer id {peer!r}")
    if not isinstance(index, int) or not isinstance(k, int) or not 0 <= index < k <= 64:
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

    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        raise ProtocolError(f"{header.kind.name} frame with payload before handshake")

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        if frame.kind != FrameKind.HELLO:
            raise ProtocolError(f"expected HELLO, got {frame.kind.name}")
        if self.initiator is not None:  # the acceptor's answer
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
        if self.hello is None:
            self.hello = _hello_fields(frame.meta)
            self.responder = auth.Responder(self.mesh.secret, (conn.peername or ("?",))[0])
            who = f"peer {self.hello[0]!r} from {conn.peername}"
            answer, done = self.responder.on_hello(frame.meta, who)
            conn.send(FrameKind.HELLO, {"peer": self.mesh.self_id, **answer})
        else:
            assert self.responder is not None
            self.responder.on_proof(frame.meta, f"peer {self.hello[0]!r} from {conn.peername}")
            done = True
        if done:
            self.mesh._accept(*self.hello, conn)

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        if self.dialled is not None and not self.dialled.done():
            self.dialled.set_exception(exc)


class Mesh:
    """This daemon's data links, keyed by peer id."""

    def __init__(
        self,
        self_id: str,
        connections: int,
        router: LinkRouter,
        limits: Limits | None = None,
        connect_timeout_s: float = 10.0,
        liveness: Callable[[], Liveness] = Liveness,
        secret: bytes | None = None,
        on_new_link: Callable[[PeerLink], None] | None = None,
    ) -> None:
        self.self_id = self_id
        self.k = connections
        self.router = router
        self.limits = limits or Limits()
        self.connect_timeout_s = connect_timeout_s
        self.liveness = liveness
        self.secret = secret
        self.links: dict[str, PeerLink] = {}
        # Told of every link as it is made (metrics count its bytes after it is gone).
        self.on_new_link = on_new_link
        self._dialling: dict[str, asyncio.Task[PeerLink]] = {}
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        # A connection that never completes its HELLO must not hold a socket forever.
        admission = Admission(
            "HELLO", self.connect_timeout_s, lambda conn: not isinstance(conn.handler, _Handshake)
        )
        accepted = admission.factory(
            lambda: FrameConnection(_Handshake(self), self.limits, "accepting")
        )
        self._server = await loop.create_server(accepted, host, port)
        sock = self._server.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def _new_link(self, peer: str) -> PeerLink:
        link = self.links[peer] = PeerLink(peer, self.k, self.router, self.liveness())
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
            link = self._new_link(peer)
        await link.wait_ready(self.connect_timeout_s)
        return link

    def _dial_done(self, peer: str, task: asyncio.Task[PeerLink]) -> None:
        self._dialling.pop(peer, None)
        if not task.cancelled():
            task.exception()  # retrieved here; the awaiting caller re-raises it

    async def _dial(self, peer: str, addr: tuple[str, int]) -> PeerLink:
        loop = asyncio.get_running_loop()
        link = self._new_link(peer)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                answers = []
                for index in range(self.k):
                    answer: asyncio.Future[None] = loop.create_future()
                    handshake = _Handshake(self, answer, (link, index))
                    _, conn = await loop.create_connection(
                        lambda h=handshake: FrameConnection(h, self.limits, peer),  # type: ignore[misc]
                        addr[0],
                        addr[1],
                    )
                    assert handshake.initiator is not None
                    hello = {"peer": self.self_id, "conn": index, "k": self.k}
                    conn.send(FrameKind.HELLO, handshake.initiator.hello(hello))
                    answers.append(answer)
                for answer in answers:
                    await answer
        except (OSError, TimeoutError, CollnetError) as exc:
            err = PeerLost(f"cannot connect to {peer} at {addr[0]}:{addr[1]}: {exc}", peer=peer)
            link.fail(err)
            raise err from None
        return link

    def _accept(self, peer: str, index: int, k: int, conn: FrameConnection) -> None:
        if k != self.k:
            raise ProtocolError(f"{peer} uses {k} connections per link, this daemon {self.k}")
        link = self.links.get(peer)
        if link is None or link.failed:
            link = self._new_link(peer)
        link.attach(index, conn)

    def drop(self, peer: str, reason: str = "dropped") -> None:
        link = self.links.pop(peer, None)
        if link is not None:
            link.fail(PeerLost(f"link to {peer} {reason}", peer=peer))

    async def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
