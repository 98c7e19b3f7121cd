"""What the kernel knows of a TCP connection's path (Linux ``TCP_INFO``).

A freshly made connection has already timed one round trip: the SYN and its
answer (and, under TLS, the handshake's records too). ``smoothed_rtt_s``
reads that figure back, so a link can be sized for a long path before any
of its own heartbeats has measured it (``collnet.transport.mesh``).
Where the option or the socket is missing (another OS, a test's fake) the
answer is ``None``: nothing is known.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Final

# struct tcp_info: eight one-byte fields, then 32-bit ones; tcpi_rtt (the
# smoothed RTT, in microseconds) is the sixteenth of those.
_RTT_OFFSET: Final = 8 + 15 * 4
_INFO_BYTES: Final = 104


def smoothed_rtt_s(sock: Any) -> float | None:
    """The kernel's smoothed round-trip time of ``sock``, or None if unknown."""
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _INFO_BYTES)
    except (OSError, AttributeError, TypeError):
        return None
    if not isinstance(info, bytes) or len(info) < _RTT_OFFSET + 4:
        return None
    (rtt_us,) = struct.unpack_from("=I", info, _RTT_OFFSET)
    return rtt_us / 1e6 if rtt_us > 0 else None
