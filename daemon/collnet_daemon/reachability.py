"""Can the others reach a joining peer's data port? The coordinator checks.

A peer advertises the address others dial (``--advertise-host``,
``--advertise-port``; behind a NAT the mapped one, not the port it listens
on). A wrong one is a silent trap: the peer registers fine over its own
outbound control connection, and only its first collective fails, on other
peers. So when a peer registers, the coordinator dials the advertised
address, runs the TLS handshake if the cluster uses TLS, and sends ``HELLO
{"probe": true}``; the daemon there answers with its peer id and hangs up
(``collnet.transport.mesh``), creating no link. The answer must name the
registering peer (with TLS its certificate must, too), so an address that
reaches *some* daemon is not taken for the right one.

The verdict (``collnet.wire.topology.Reachability``) is shown in ``collnet
status`` and told to the peer in the answer to its next link report; a
failure is logged here too. Bounded: one verdict per registered peer,
forgotten when it leaves, one check in flight per peer, each within
``timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from collnet.errors import AuthError, CollnetError, ProtocolError
from collnet.membership import PeerInfo, identity
from collnet.transport.connection import FrameConnection
from collnet.transport.tls import Tls, peer_name
from collnet.transport.tls import connect as tls_connect
from collnet.wire import Frame, FrameKind, Header, Limits
from collnet.wire.topology import MAX_ERROR_CHARS, Reachability
from collnet_daemon.tasks import TaskSet

log = logging.getLogger(__name__)

_PROBE_LIMITS = Limits(max_meta_bytes=4096, max_payload_bytes=0)


class _ProbeAnswer:
    """The handler of a check's connection: the daemon's HELLO answer, nothing else."""

    def __init__(self, answered: asyncio.Future[Any]) -> None:
        self.answered = answered

    def payload_sink(self, conn: FrameConnection, header: Header, meta: Any) -> memoryview | None:
        raise ProtocolError(f"{header.kind.name} frame with a payload in answer to a probe")

    def on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        if frame.kind != FrameKind.HELLO:
            raise ProtocolError(f"expected HELLO in answer to a probe, got {frame.kind.name}")
        if not self.answered.done():
            self.answered.set_result(frame.meta)

    def on_lost(self, conn: FrameConnection, exc: CollnetError) -> None:
        if not self.answered.done():
            self.answered.set_exception(exc)


class ReachabilityChecks:
    """The coordinator's checks of its peers' data ports; see the module docstring."""

    def __init__(self, tls: Tls | None, timeout_s: float = 5.0) -> None:
        self.tls = tls
        self.timeout_s = timeout_s
        self._verdicts: dict[str, Reachability] = {}
        self._tasks = TaskSet(lambda exc: log.warning("reachability check failed: %r", exc))

    def check(self, peer: PeerInfo) -> None:
        """``peer`` registered: check its advertised address (again)."""
        address = f"{peer.host}:{peer.port}"
        self._verdicts[peer.id] = Reachability(peer.id, address, None)
        self._tasks.spawn(self._check(peer, address))

    def forget(self, peer_id: str) -> None:
        self._verdicts.pop(peer_id, None)

    def verdict(self, peer_id: str) -> Reachability | None:
        return self._verdicts.get(peer_id)

    def rows(self) -> tuple[Reachability, ...]:
        return tuple(self._verdicts[p] for p in sorted(self._verdicts))

    def close(self) -> None:
        self._tasks.cancel()

    async def _check(self, peer: PeerInfo, address: str) -> None:
        try:
            await asyncio.wait_for(self._probe(peer), self.timeout_s)
            error = None
        except TimeoutError:
            error = f"no answer within {self.timeout_s:.1f}s"
        except (OSError, CollnetError) as exc:
            error = str(exc) or type(exc).__name__
        current = self._verdicts.get(peer.id)
        if current is None or current.address != address:
            return  # it left, or registered again elsewhere, meanwhile
        if error is not None:
            error = error[:MAX_ERROR_CHARS]
            log.warning(
                "peer %r: its data port %s is not reachable from the coordinator: %s "
                "(check --advertise-host/--advertise-port, firewalls and NAT mappings)",
                peer.id,
                address,
                error,
            )
        self._verdicts[peer.id] = Reachability(peer.id, address, error is None, error)

    async def _probe(self, peer: PeerInfo) -> None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Any] = loop.create_future()
        _, made = await tls_connect(
            lambda: FrameConnection(_ProbeAnswer(answered), _PROBE_LIMITS, f"probe {peer.id}"),
            peer.host,
            peer.port,
            self.tls,
            self.timeout_s,
        )
        assert isinstance(made, FrameConnection)
        try:
            if self.tls is not None:
                identity.check_claim(peer_name(made.transport), peer.id, f"data port of {peer.id}")
            made.send(FrameKind.HELLO, {"probe": True})
            meta = await answered
        finally:
            made.close()
        named = meta.get("peer") if isinstance(meta, dict) else None
        if named != peer.id:
            raise AuthError(f"a daemon named {named!r:.70} answers there, not {peer.id!r}")
