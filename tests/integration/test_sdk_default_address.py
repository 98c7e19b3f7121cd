"""Where ``collnet_client.connect()`` finds its daemon when given no address.

Order: the argument, ``$COLLNET_DAEMON``, the daemon's default ipc socket,
then its loopback TCP fallback. The fallback is off unless the daemon is
given ``--ipc-tcp-port``, and then it serves only requests that carry the
daemon's token (``$COLLNET_IPC_TOKEN_FILE``; see tests/security for other users).
"""

from __future__ import annotations

import socket
from pathlib import Path

import collnet_client
import collnet_client.client as client_module
import numpy as np
import pytest
from cluster_harness import running_peers, tcp_listen_ports
from collnet_client import DaemonUnavailable

from collnet.errors import AuthError

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
        # The daemon's token, next to its ipc socket by default.
        token_file = p.cluster.daemons[0].ipc.removeprefix("ipc://") + ".token"
        monkeypatch.setenv("COLLNET_IPC_TOKEN_FILE", token_file)
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


def test_the_tcp_fallback_is_off_by_default_and_needs_the_token_when_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLLNET_DAEMON", raising=False)
    monkeypatch.setattr(client_module, "DEFAULT_IPC", f"ipc://{tmp_path}/absent.sock")
    port = _free_port()
    monkeypatch.setattr(client_module, "DEFAULT_TCP_PORT", port)
    with running_peers(1, tmp_path / "off", admit=False) as p:
        # A daemon started without --ipc-tcp-port serves no fallback: its one TCP
        # port is its data port.
        daemon = p.cluster.daemons[0]
        assert tcp_listen_ports(daemon.proc.pid) == {int(daemon.data.rsplit(":", 1)[1])}
    with running_peers(1, tmp_path / "on", admit=False, extra_args=["--ipc-tcp-port", str(port)]):
        monkeypatch.setenv("COLLNET_IPC_TOKEN_FILE", str(tmp_path / "no-such-token"))
        with pytest.raises(AuthError, match="no token"):
            collnet_client.connect(timeout_s=10)
        wrong = tmp_path / "wrong-token"
        wrong.write_text("0" * 64)
        monkeypatch.setenv("COLLNET_IPC_TOKEN_FILE", str(wrong))
        with pytest.raises(AuthError, match="wrong token"):
            collnet_client.connect(timeout_s=10)
