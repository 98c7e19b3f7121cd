"""collnet: fault-tolerant collective communication for training over the WAN.

The core package is pure: protocol logic, codecs and collective schedules take
bytes, arrays and events and return bytes, arrays and actions. Sockets, event
loops and processes live in ``collnet.transport``, ``collnet_daemon`` and
``collnet_client``.
"""

from collnet.errors import (
    CodecError,
    CollectiveAborted,
    CollnetError,
    DaemonUnavailable,
    InvalidArgument,
    MismatchError,
    PeerLost,
    ProtocolError,
    Timeout,
)

__version__ = "0.1.0"

__all__ = [
    "CodecError",
    "CollectiveAborted",
    "CollnetError",
    "DaemonUnavailable",
    "InvalidArgument",
    "MismatchError",
    "PeerLost",
    "ProtocolError",
    "Timeout",
    "__version__",
]
