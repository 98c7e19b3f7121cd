"""Where a node's daemon serves its trainers, when nobody says otherwise.

The daemon binds its IPC socket (``DEFAULT_IPC``) and, as a fallback for
trainers that cannot reach that path (another mount namespace, a platform
without Unix sockets), a loopback TCP port (``DEFAULT_TCP_PORT``). A trainer
that is given no address and finds no ``COLLNET_DAEMON`` in its environment
tries them in that order.
"""

from __future__ import annotations

from typing import Final

DEFAULT_IPC: Final = "ipc:///tmp/collnet-daemon.sock"
DEFAULT_TCP_PORT: Final = 29700


def loopback_tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"
