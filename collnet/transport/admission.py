"""What strangers can make a listener hold: a handshake deadline and a connection cap.

A listener (the coordinator's control port, a daemon's data port) hands its
protocol factory to ``Admission.factory`` and says, through ``admitted``,
when a connection has passed its handshake (proved the secret or its
certificate, registered). Then:

- a connection not admitted ``handshake_timeout_s`` after it was accepted is
  closed: half-open or silent connections cannot hold sockets for long;
- at most ``max_connections`` are open at once (``fd_bounded`` fits a cap to
  the process's descriptor limit). At the cap, a new connection
  takes the place of the oldest one still in its handshake from the remote
  host that holds the most of those, so a flood of half-open connections
  (from one host above all) cannot lock out a status query or a daemon's
  registration; only when every open connection is admitted is the new one
  closed at once;
- each of these is logged, at most one line per kind of event every
  ``LOG_EVERY_S`` (``collnet.transport.loglimit``, the kind as the source), the
  others counted, so a flood of connections does not flood the log.

Addresses are the kernel's, not the peer's words, so they are logged as they
are. With TLS (``collnet.transport.tls.serve``) the factory runs once the TLS
handshake is done, which that layer bounds itself.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Callable
from typing import Any

from collnet.transport.connection import FrameConnection
from collnet.transport.loglimit import LogLimiter

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
# Descriptors kept back from a listener's connections: listeners, a metrics
# endpoint and its scrapes, the event loop's own, standard streams.
FD_RESERVE = 32


def fd_bounded(max_connections: int, reserve: int = FD_RESERVE) -> int:
    """``max_connections``, lowered so that the connections fit this process's
    descriptor limit: past it accept() fails, and nobody gets in, not even a
    status query, until some connection closes."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - reserve))


class _Refused(asyncio.BufferedProtocol):
    """A connection over the cap: closed as soon as it exists."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:  # pragma: no cover - never reads
        return memoryview(bytearray(1))

    def buffer_updated(self, nbytes: int) -> None:  # pragma: no cover
        pass


class Admission:
    """The gate of one listener; see the module docstring.

    ``what`` names the handshake in log lines ("no HELLO within 10.0s").
    ``admitted(conn)`` says whether ``conn`` has passed it; ``max_connections``
    None means no cap (the deadline still applies).
    """

    def __init__(
        self,
        what: str,
        handshake_timeout_s: float,
        admitted: Callable[[FrameConnection], bool],
        max_connections: int | None = None,
    ) -> None:
        self.what = what
        self.handshake_timeout_s = handshake_timeout_s
        self.admitted = admitted
        self.max_connections = max_connections
        # Open connections in the order they were accepted (pruned at the cap).
        self._open: dict[FrameConnection, None] = {}
        self._log = LogLimiter(per_interval=1, interval_s=LOG_EVERY_S)
        self.expired = self.evicted = self.refused = 0

    @property
    def open_connections(self) -> int:
        self._prune()
        return len(self._open)

    def factory(
        self, make: Callable[[], FrameConnection]
    ) -> Callable[[], asyncio.BufferedProtocol]:
        """The protocol factory to listen with: ``make()`` for a connection let in."""

        def accepted() -> asyncio.BufferedProtocol:
            if self.max_connections is not None and len(self._open) >= self.max_connections:
                self._prune()
                if len(self._open) >= self.max_connections and not self._evict():
                    self.refused += 1
                    self._log.warning(
                        log,
                        "refused at the connection cap",
                        "refusing a connection: %d connections open, all past their %s "
                        "(the cap, --max-connections)",
                        len(self._open),
                        self.what,
                    )
                    return _Refused()
            conn = make()
            self._open[conn] = None
            asyncio.get_running_loop().call_later(self.handshake_timeout_s, self._expire, conn)
            return conn

        return accepted

    def _prune(self) -> None:
        self._open = {c: None for c in self._open if not c.closed}

    def _evict(self) -> bool:
        """Close the oldest connection still in its handshake from the remote host
        with the most of them; False if every open connection is admitted."""
        waiting = [c for c in self._open if c.transport is not None and not self.admitted(c)]
        if not waiting:
            return False
        hosts = Counter(_host(c) for c in waiting)
        crowded = hosts.most_common(1)[0][0]
        victim = next(c for c in waiting if _host(c) == crowded)
        self.evicted += 1
        self._log.warning(
            log,
            "closed to make room at the connection cap",
            "at the connection cap (%d): closing the oldest connection still in its %s, "
            "from %s (%d from that host)",
            self.max_connections,
            self.what,
            victim.peername,
            hosts[crowded],
        )
        victim.abort()
        del self._open[victim]
        return True

    def _expire(self, conn: FrameConnection) -> None:
        if not conn.closed and conn.transport is not None and not self.admitted(conn):
            self.expired += 1
            self._log.warning(
                log,
                "closed at the handshake deadline",
                "connection from %s: no %s within %.1fs; closing",
                conn.peername,
                self.what,
                self.handshake_timeout_s,
            )
            conn.abort()
        # Without a cap nothing is counted; with one, admitted connections stay
        # counted until they close (pruned at the cap, so at most the cap).
        if self.max_connections is None or conn.closed or conn.transport is None:
            self._open.pop(conn, None)


def _host(conn: FrameConnection) -> Any:
    return conn.peername[0] if isinstance(conn.peername, tuple) else conn.peername
