"""How many TCP connections a link gets, and its socket buffers (sans-I/O).

One TCP stream carries at most one window per round trip, and the kernel caps
a socket's window (``net.core.wmem_max``, doubled; here 8 MiB asked for,
4 MiB granted). A link whose bandwidth-delay product (BDP) exceeds what one
window holds needs several streams to stay full: ``connections_for`` gives
``K = ceil(BDP / window)`` bounded to ``[MIN_CONNECTIONS, MAX_CONNECTIONS]``.
A loopback or LAN link (tiny BDP) gets one stream: striping there only adds
frames and wake-ups per byte.

The dialler of a link decides K and says so in its HELLO; the acceptor takes
any K the wire allows (``collnet.transport.mesh``), so peers configured
differently still link. A link made again is sized from what the previous
one measured (``connections_after``). Without an estimate the link keeps a fixed default
(``UNKNOWN_LINK_CONNECTIONS``), except to a loopback address, whose RTT is
known to be negligible, and on a path whose round trip the dialler's first
connection has timed (``rtt_s``): there the link gets at least what a
``NOMINAL_LINK_BPS`` link of that RTT needs, with ``RTT_HEADROOM`` to spare
(a link keeps its K, so one dialled at K = 4 on a 200 ms path could never
carry more than 4 windows per 200 ms: 0.67 Gbit/s with 4 MiB windows).

K is sized for a node's whole link. A schedule that sends to several peers at
once (the direct all-reduce: to all ``W - 1``) shares that link among them,
so each of those links stripes a message over only ``connections_sharing``
of its connections: together they still keep at least K windows in flight.
All K at once overfilled the path: in the WAN lab at 400 Mbit/s and 200 ms
(K = 8, sized for a nominal 1 Gbit/s), 24 BBR connections on one host's link
lost 4-58 MB per 64 MiB direct all-reduce, with 3 per peer almost nothing.

Units: bandwidth in bits per second (as ``collnet.topology.matrix``), RTT in
seconds, sizes in bytes.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Final

MIN_CONNECTIONS: Final = 1
MAX_CONNECTIONS: Final = 16
# What a link gets when nothing is known about it (and it is not loopback).
UNKNOWN_LINK_CONNECTIONS: Final = 4
# What a link of unknown bandwidth is sized for when only its RTT is known, and
# the share of windows it gets beyond that BDP (K = 4 up to 134 ms, 8 at 200 ms).
NOMINAL_LINK_BPS: Final = 1e9
RTT_HEADROOM: Final = 1.25
# The window one stream can keep in flight where the daemon does not say: half
# the smaller of its buffers (collnet.transport.sockbuf), 4 MiB on the machines
# measured.
DEFAULT_WINDOW_BYTES: Final = 4 << 20
# A stripe that carried this share of its windows' worth per round trip was
# limited by them, not by the path.
WINDOW_BOUND: Final = 0.7


@dataclass(frozen=True, slots=True)
class LinkFigures:
    """A link's measured (or assumed) bandwidth and round-trip time."""

    bandwidth_bps: float
    rtt_s: float

    @property
    def bdp_bytes(self) -> float:
        return self.bandwidth_bps / 8 * self.rtt_s


def connections_for(
    estimate: LinkFigures | None,
    host: str = "",
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    default: int = UNKNOWN_LINK_CONNECTIONS,
    rtt_s: float | None = None,
) -> int:
    """K for a link to ``host`` with ``estimate``, on a path whose round trip
    was timed at ``rtt_s`` if known (see the module docstring)."""
    if estimate is None:
        if is_loopback(host):
            return MIN_CONNECTIONS
        if rtt_s is None or not (math.isfinite(rtt_s) and rtt_s > 0):
            return clamp_connections(default)
        nominal = LinkFigures(NOMINAL_LINK_BPS, rtt_s).bdp_bytes * RTT_HEADROOM
        return clamp_connections(max(default, math.ceil(nominal / max(1, window_bytes))))
    if not (math.isfinite(estimate.bdp_bytes) and estimate.bdp_bytes > 0):
        return MIN_CONNECTIONS
    return clamp_connections(math.ceil(estimate.bdp_bytes / max(1, window_bytes)))


def connections_sharing(k: int, fan: int) -> int:
    """Connections of a K-connection link that carry a message sent while
    ``fan`` links share this node's own (see the module docstring)."""
    return max(MIN_CONNECTIONS, min(k, -(-k // max(1, fan))))


def clamp_connections(k: int) -> int:
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, k))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connections_after(measured: LinkFigures, k_before: int, window_bytes: int) -> int:
    """K for a link made again, from what its previous K of ``k_before`` carried.

    A measured rate is what the link achieved, not what the path holds: a
    stripe whose streams were each a full window in flight (measured BDP at
    least ``WINDOW_BOUND`` of ``k_before`` windows) was limited by its own
    windows, so the next gets twice as many; otherwise the measured BDP says.
    """
    full = k_before * max(1, window_bytes)
    if measured.bdp_bytes >= WINDOW_BOUND * full:
        return clamp_connections(2 * k_before)
    return connections_for(measured, "", window_bytes)
