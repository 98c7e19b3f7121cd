"""A dialler that gave up a link without the acceptor seeing it close (the
acceptor was frozen past its heartbeats, say) dials again: once it proves who
it is, its new link replaces the stale one, whose users fail at once with
``PeerLost``. A loopback peer with no secret only claims its name, so its
duplicate is refused and the link it claims stays as it was."""

from __future__ import annotations

import asyncio

import pytest
from recording_router import RecordingRouter

from collnet.errors import PeerLost
from collnet.transport.mesh import Mesh

SECRET = b"mesh-redial-test-secret-01234567"


@pytest.mark.timeout(30)
async def test_a_proven_new_dial_replaces_the_link_its_dialler_gave_up() -> None:
    # "a" sorts first, so "a" dials and "z" accepts.
    z_router = RecordingRouter()
    z = Mesh("z", None, z_router, connect_timeout_s=5.0, secret=SECRET)
    a = Mesh("a", 2, RecordingRouter(), connect_timeout_s=5.0, secret=SECRET)
    try:
        addr = await z.listen("127.0.0.1", 0)
        first = await a.get_link("z", addr)
        stale = await z.get_link("a", ("127.0.0.1", 1))
        # "a" forgets its link and leaves its connections open: "z" sees nothing.
        del a.links["z"]
        second = await a.get_link("z", addr)
        fresh = await z.get_link("a", ("127.0.0.1", 1))
        assert second is not first and fresh is not stale
        assert fresh.k == 2 and all(c is not None for c in fresh.conns) and not fresh.failed
        assert isinstance(stale.error, PeerLost) and "new dial" in str(stale.error)
        assert [(peer, exc) for peer, exc in z_router.lost] == [("a", stale.error)]
        # The old connections are closed with the stale link.
        assert all(c is not None and c.closed for c in stale.conns)
    finally:
        first.close()
        await a.close()
        await z.close()


@pytest.mark.timeout(30)
async def test_an_unproven_duplicate_dial_is_refused_and_the_link_kept() -> None:
    z_router = RecordingRouter()
    z = Mesh("z", None, z_router, connect_timeout_s=2.0)
    a = Mesh("a", 2, RecordingRouter(), connect_timeout_s=2.0)
    try:
        addr = await z.listen("127.0.0.1", 0)
        first = await a.get_link("z", addr)
        kept = await z.get_link("a", ("127.0.0.1", 1))
        del a.links["z"]
        # Answered before it was refused, the new link looks made to "a" until
        # "z" closes its connections.
        second = await a.get_link("z", addr)
        for _ in range(500):
            if second.failed:
                break
            await asyncio.sleep(0.01)
        assert isinstance(second.error, PeerLost)
        assert z.links["a"] is kept and not kept.failed and not z_router.lost
    finally:
        first.close()
        await a.close()
        await z.close()
