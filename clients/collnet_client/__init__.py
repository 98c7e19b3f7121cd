"""collnet_client: the SDK a trainer uses to call its local collnet daemon.

``comm = collnet_client.connect("ipc:///tmp/collnet.sock")`` then
``comm.update_topology()`` and ``comm.all_reduce(array, op="avg", codec="uint8")``.
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
    WaitTimeout,
)
from collnet_client.client import Comm, Handle, SyncResult, World, connect

__all__ = [
    "CodecError",
    "CollectiveAborted",
    "CollnetError",
    "Comm",
    "DaemonUnavailable",
    "Handle",
    "InvalidArgument",
    "MismatchError",
    "PeerLost",
    "ProtocolError",
    "SyncResult",
    "Timeout",
    "WaitTimeout",
    "World",
    "connect",
]
