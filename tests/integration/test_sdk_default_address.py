"""Where ``collnet_client.connect()`` finds its daemon when given no address.

Order: the argument, ``$COLLNET_DAEMON``, the daemon's default ipc socket,
then its loopback TCP fallback. A real daemon serves both endpoints.
"""

from __future__ import annotations

import socket
from pathlib import Path

import collnet_client
import collnet_client.client as client_module
import numpy as np
import pytest
from cluster_harness import running_peers
from collnet_client import DaemonUnavailable

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reduces(comm: collnet_client.Comm) -> None:
    comm.update_topology()
    out = comm.all_reduce(np.arange(10, dtype=np.float32), op="sum", tag="d1")
    assert np.array_equal(out, np.arange(10, dtype=np.float32))  # a world of one


def test_connect_falls_back_from_the_ipc_socket_to_loopback_tcp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    with running_peers(1, tmp_path, admit=False, extra_args=["--ipc-tcp-port", str(port)]) as p:
        monkeypatch.delenv("COLLNET_DAEMON", raising=False)
        monkeypatch.setattr(client_module, "DEFAULT_TCP_PORT", port)
        # The default ipc path does not exist here: the TCP fallback answers.
        monkeypatch.setattr(client_module, "DEFAULT_IPC", f"ipc://{tmp_path}/absent.sock")
        with collnet_client.connect(timeout_s=20) as comm:
            assert comm.address == f"tcp://127.0.0.1:{port}"
            assert comm.peer_id == p.cluster.daemons[0].peer_id
            _reduces(comm)
        # Where the ipc socket exists, it is preferred.
        monkeypatch.setattr(client_module, "DEFAULT_IPC", p.cluster.daemons[0].ipc)
        with collnet_client.connect(timeout_s=20) as comm:
            assert comm.address == p.cluster.daemons[0].ipc
        # The environment wins over both.
        monkeypatch.setenv("COLLNET_DAEMON", f"tcp://127.0.0.1:{port}")
        with collnet_client.connect(timeout_s=20) as comm:
            assert comm.address == f"tcp://127.0.0.1:{port}"


def test_no_daemon_anywhere_is_a_typed_error_naming_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLLNET_DAEMON", raising=False)
    monkeypatch.setattr(client_module, "DEFAULT_IPC", f"ipc://{tmp_path}/absent.sock")
    monkeypatch.setattr(client_module, "DEFAULT_TCP_PORT", _free_port())
    with pytest.raises(DaemonUnavailable, match=r"absent\.sock") as info:
        collnet_client.connect(timeout_s=5)
    assert "tcp://127.0.0.1" in str(info.value)
