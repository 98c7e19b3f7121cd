"""A listener's gate (collnet.transport.admission) over real loopback sockets, in-process.

A connection is "admitted" here once it sends a HELLO frame; the tests check
who gets closed, when, and that the log says so without a line per connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from collnet.errors import CollnetError
from collnet.transport.admission import Admission
from collnet.transport.connection import FrameConnection
from collnet.transport.mesh import Mesh
from collnet.wire import Frame, FrameKind, Header, Limits, frame_bytes

pytestmark = pytest.mark.timeout(30)


class _Gate:
    """A handler that counts a connection as admitted once it said HELLO."""

    def __init__(self) -> None:
        self.hello = False

    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        return None

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        self.hello = self.hello or frame.kind == FrameKind.HELLO

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        pass


def _admitted(conn: FrameConnection) -> bool:
    return isinstance(conn.handler, _Gate) and conn.handler.hello


@pytest.fixture
async def listener(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Admission, int]]:
    timeout_s, cap = request.param
    admission = Admission("HELLO", timeout_s, _admitted, cap)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        admission.factory(lambda: FrameConnection(_Gate(), Limits())), "127.0.0.1", 0
    )
    yield admission, server.sockets[0].getsockname()[1]
    server.close()


async def _connect(port: int, source: str = "127.0.0.1", hello: bool = False) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if hello:
        writer.write(frame_bytes(FrameKind.HELLO, {}))
        await writer.drain()
    return reader, writer


async def _closed_within(stream: Any, timeout_s: float) -> bool:
    reader, _ = stream
    try:
        got: bytes = await asyncio.wait_for(reader.read(1), timeout_s)
        return got == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("listener", [(0.3, None)], indirect=True)
async def test_a_connection_without_its_handshake_is_closed_at_the_deadline(
    listener: tuple[Admission, int], caplog: pytest.LogCaptureFixture
) -> None:
    admission, port = listener
    with caplog.at_level(logging.WARNING, logger="collnet.transport.admission"):
        silent = [await _connect(port) for _ in range(20)]
        greeted = await _connect(port, hello=True)
        assert all([await _closed_within(s, 3.0) for s in silent])
        assert not await _closed_within(greeted, 0.5)
    assert admission.expired == 20
    lines = [r.getMessage() for r in caplog.records]
    assert any("no HELLO within 0.3s; closing" in line for line in lines)
    assert len(lines) <= 2, lines  # one line and a "suppressing" notice, not 20


@pytest.mark.parametrize("listener", [(30.0, 3)], indirect=True)
async def test_at_the_cap_the_busiest_host_loses_its_oldest_unadmitted_connection(
    listener: tuple[Admission, int],
) -> None:
    admission, port = listener
    lone = await _connect(port, "127.0.0.2")  # the oldest of all, but alone on its host
    crowd = [await _connect(port), await _connect(port)]
    await asyncio.sleep(0.1)
    newcomer = await _connect(port, "127.0.0.2")
    assert await _closed_within(crowd[0], 2.0)
    assert not await _closed_within(lone, 0.3)
    assert not await _closed_within(crowd[1], 0.1)
    assert not await _closed_within(newcomer, 0.1)
    assert admission.evicted == 1 and admission.refused == 0


@pytest.mark.parametrize("listener", [(30.0, 2)], indirect=True)
async def test_at_the_cap_with_all_admitted_a_newcomer_is_refused_at_once(
    listener: tuple[Admission, int],
) -> None:
    admission, port = listener
    members = [await _connect(port, hello=True) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert await _closed_within(await _connect(port), 2.0)
    assert admission.refused == 1 and admission.evicted == 0
    assert not any([await _closed_within(m, 0.1) for m in members])
    # One leaves: there is room again once its close is seen.
    members.pop()[1].close()
    await asyncio.sleep(0.2)
    assert not await _closed_within(await _connect(port, hello=True), 0.3)
    assert admission.refused == 1


def test_the_cap_fits_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from collnet.transport import admission

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (128, 4096))
    assert admission.fd_bounded(1024) == 96 and admission.fd_bounded(50) == 50
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (16, 16))
    assert admission.fd_bounded(1024) == 1
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (resource.RLIM_INFINITY,) * 2)
    assert admission.fd_bounded(1024) == 1024


async def test_a_daemons_data_port_is_capped_too() -> None:
    """The mesh listens through the same gate with a cap: at it, the oldest
    connection still without its HELLO makes way for a newcomer."""
    mesh = Mesh("d0", 1, router=None, connect_timeout_s=30.0, max_connections=2)  # type: ignore[arg-type]
    _, port = await mesh.listen("127.0.0.1", 0)
    try:
        first, second = await _connect(port), await _connect(port)
        await asyncio.sleep(0.1)
        third = await _connect(port)
        assert await _closed_within(first, 5.0), "the oldest half-open connection stayed"
        assert not await _closed_within(second, 0.3)
        assert not await _closed_within(third, 0.3)
        for _, writer in (second, third):
            writer.close()
    finally:
        await mesh.close()
