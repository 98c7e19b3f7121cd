"""A dialler that gave up a link without the acceptor seeing it close (the
acceptor was frozen past its heartbeats, say) dials again: once it proves who
it is, its new link replaces the stale one, whose users fail at once with
``PeerLost``. A loopback peer with no secret only claims its name, so its
duplicate is refused and the link it claims stays as it was. And a dialler
that gives a link up while its handshakes are open closes their connections,
so a frozen acceptor never thaws into a link nobody serves."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from recording_router import RecordingRouter

from collnet.errors import PeerLost
from collnet.transport.link import PeerLink
from collnet.transport.mesh import Mesh

SECRET = b"mesh-redial-test-secret-01234567"


@dataclass
class Pair:
    """A link from mesh "a" (the dialler: "a" sorts first) to mesh "z"."""

    a: Mesh
    z: Mesh
    z_router: RecordingRouter
    addr: tuple[str, int]
    dialled: PeerLink  # a's side
    accepted: PeerLink  # z's side


@asynccontextmanager
async def linked(secret: bytes | None, timeout_s: float) -> AsyncIterator[Pair]:
    z_router = RecordingRouter()
    z = Mesh("z", None, z_router, connect_timeout_s=timeout_s, secret=secret)
    a = Mesh("a", 2, RecordingRouter(), connect_timeout_s=timeout_s, secret=secret)
    dialled = None
    try:
        addr = await z.listen("127.0.0.1", 0)
        dialled = await a.get_link("z", addr)
        accepted = await z.get_link("a", ("127.0.0.1", 1))
        # "a" forgets its link and leaves its connections open: "z" sees nothing.
        del a.links["z"]
        yield Pair(a, z, z_router, addr, dialled, accepted)
    finally:
        if dialled is not None:
            dialled.close()
        await a.close()
        await z.close()


@pytest.mark.timeout(30)
async def test_a_proven_new_dial_replaces_the_link_its_dialler_gave_up() -> None:
    async with linked(SECRET, 5.0) as p:
        second = await p.a.get_link("z", p.addr)
        fresh = await p.z.get_link("a", ("127.0.0.1", 1))
        stale = p.accepted
        assert second is not p.dialled and fresh is not stale
        assert fresh.k == 2 and all(c is not None for c in fresh.conns) and not fresh.failed
        assert isinstance(stale.error, PeerLost) and "new dial" in str(stale.error)
        assert [(peer, exc) for peer, exc in p.z_router.lost] == [("a", stale.error)]
        # The old connections are closed with the stale link.
        assert all(c is not None and c.closed for c in stale.conns)


@pytest.mark.timeout(30)
async def test_an_unproven_duplicate_dial_is_refused_and_the_link_kept() -> None:
    async with linked(None, 2.0) as p:
        # "z" answers each HELLO before it refuses the connection: the dial fails,
        # or, answered in full before a refusal lands, its link does right after.
        try:
            second = await p.a.get_link("z", p.addr)
        except PeerLost:
            pass
        else:
            for _ in range(500):
                if second.failed:
                    break
                await asyncio.sleep(0.01)
            assert isinstance(second.error, PeerLost)
        kept = p.accepted
        assert p.z.links["a"] is kept and not kept.failed and not p.z_router.lost


async def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Whether ``sock`` (after whatever was sent) ends within ``within_s``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within_s):
            while await loop.sock_recv(sock, 1 << 16):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.timeout(30)
async def test_a_dial_given_up_mid_handshake_closes_its_connections() -> None:
    # "z" is frozen: its kernel completes the connections, nobody answers.
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(8)
    frozen.setblocking(False)
    a = Mesh("a", 2, RecordingRouter(), connect_timeout_s=20.0)
    backlog: list[socket.socket] = []
    loop = asyncio.get_running_loop()
    try:
        dial = asyncio.ensure_future(a.get_link("z", frozen.getsockname()))
        # Taken from the backlog only to know both exist: nothing answers them.
        for _ in range(2):
            conn, _addr = await asyncio.wait_for(loop.sock_accept(frozen), 2.0)
            conn.setblocking(False)
            backlog.append(conn)
        a.drop("z", "left the world")
        # Given up, the dial ends now, not at its 20 s deadline.
        with pytest.raises(PeerLost):
            await asyncio.wait_for(dial, 2.0)
        # "z" thaws: it finds both connections, with their HELLOs, already closed.
        assert [await _closed_by_peer(c, 2.0) for c in backlog] == [True, True]
    finally:
        for c in backlog:
            c.close()
        frozen.close()
        await a.close()
