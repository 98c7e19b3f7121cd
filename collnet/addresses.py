"""Where a node's daemon serves its trainers, when nobody says otherwise.

The daemon binds its IPC socket (``DEFAULT_IPC``) and, as a fallback for
trainers that cannot reach that path (another mount namespace, a platform
without Unix sockets), a loopback TCP port (``DEFAULT_TCP_PORT``). A trainer
that is given no address and finds no ``COLLNET_DAEMON`` in its environment
tries them in that order.

The TCP fallback is off unless the daemon is given ``--ipc-tcp-port``, and
then every request on it must carry the token the daemon writes to its token
file (by default ``token_file_for(ipc)``, next to the ipc socket), which only
the daemon's user (and its ``--ipc-group``) can read.
"""

from __future__ import annotations

from typing import Final

DEFAULT_IPC: Final = "ipc:///tmp/collnet-daemon.sock"
DEFAULT_TCP_PORT: Final = 29700


def loopback_tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def token_file_for(ipc: str) -> str | None:
    """Where a daemon serving ``ipc`` writes its TCP token by default: next to the
    socket file; None for an address with no file (tcp://, abstract ipc://@)."""
    path = ipc.removeprefix("ipc://")
    if path == ipc or path.startswith("@"):
        return None
    return path + ".token"
