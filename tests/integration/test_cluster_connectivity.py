"""Connectivity basics on real daemons: an advertised port that differs from the
listening one (a NAT's mapping, here a TCP port forwarder), the unspecified
address refused at start-up, and an unreachable advertised port reported to
its peer and in ``collnet status``."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_harness import running_peers, status_json, wait_for_log, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Forwarder:
    """A TCP port forwarder (what a NAT's port mapping does to a connection):
    accepts on its own port and relays bytes both ways to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.accepted = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        for s in self._socks:
            s.close()


@contextmanager
def forwarding(target: tuple[str, int]) -> Iterator[Forwarder]:
    fwd = Forwarder(target)
    try:
        yield fwd
    finally:
        fwd.close()


@pytest.mark.timeout(120)
def test_peers_dial_the_advertised_port_through_a_forwarder(tmp_path: Path) -> None:
    listen_port = _free_port()
    with forwarding(("127.0.0.1", listen_port)) as fwd, running_peers(2, tmp_path / "c") as p:
        # The newcomer listens on one port and is reached on another (highest id:
        # both members dial it).
        p.cluster.extra_args = [
            "--listen", f"127.0.0.1:{listen_port}", "--advertise-port", str(fwd.port),
        ]  # fmt: skip
        joiner = p.cluster.add_daemon()
        assert joiner.data == f"127.0.0.1:{fwd.port}"
        p.comms.append(p.connect(2))
        assert {w.size for w in p.sync_world()} == {3}
        inputs = [np.full(1 << 20, float(r + 1), np.float32) for r in range(3)]
        results = p.all_reduce(inputs)
        assert all(np.array_equal(r, np.full(1 << 20, 6.0, np.float32)) for r in results)
        assert fwd.accepted >= 2  # the members' links (and the coordinator's check) came through it
        wait_until(
            lambda: any(
                r["peer"] == joiner.peer_id and r["reachable"] is True
                for r in status_json(p.cluster.coordinator_addr)["reachability"]
            ),
            20.0,
            "the forwarded port checked reachable",
        )
        rows = {r["id"]: r for r in status_json(p.cluster.coordinator_addr)["peers"]}
        assert rows[joiner.peer_id]["data"] == f"127.0.0.1:{fwd.port}"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--listen", "0.0.0.0:0"], "--listen"),
        (["--listen", "[::]:0"], "--listen"),
        (["--advertise-host", "0.0.0.0"], "--advertise-host"),
        (["--listen", "0.0.0.0:0", "--advertise-host", "::"], "--advertise-host"),
    ],
)
@pytest.mark.timeout(60)
def test_advertising_the_unspecified_address_is_refused_at_start_up(
    tmp_path: Path, args: list[str], option: str
) -> None:
    # No coordinator is needed: the daemon refuses before it dials anything.
    proc = subprocess.run(
        [sys.executable, "-m", "collnet_daemon", "daemon", "--coordinator", "127.0.0.1:9",
         "--ipc", f"ipc://{tmp_path}/d.sock", *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert option in err and "unspecified address" in err, err
    assert "--advertise-host" in err  # the way out is named


@pytest.mark.timeout(120)
def test_an_unreachable_advertised_port_is_reported_to_the_peer_and_instatus_json(
    tmp_path: Path,
) -> None:
    closed = _free_port()  # nothing listens there
    with running_peers(1, tmp_path / "c") as p:
        p.cluster.extra_args = ["--advertise-port", str(closed)]
        joiner = p.cluster.add_daemon()
        addr = p.cluster.coordinator_addr

        def verdict() -> dict[str, Any] | None:
            rows = [r for r in status_json(addr)["reachability"] if r["peer"] == joiner.peer_id]
            return rows[0] if rows and rows[0]["reachable"] is not None else None

        wait_until(lambda: verdict() is not None, 20.0, "the joiner's port checked")
        row = verdict()
        assert row is not None and row["reachable"] is False
        assert row["address"] == f"127.0.0.1:{closed}" and row["error"]
        # The peer itself is told, in its log, with what to check.
        log = p.cluster.dir / f"daemon{joiner.index}.log"
        text = wait_for_log(log, ["cannot reach this daemon's advertised data port"], 0, 20.0)
        assert "--advertise-port" in text
        table = subprocess.run(
            [sys.executable, "-m", "collnet_daemon", "status", "--coordinator", addr],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert f"UNREACHABLE data port of {joiner.peer_id} at 127.0.0.1:{closed}" in table.stdout
        # The reachable member is not flagged.
        member = p.cluster.daemons[0].peer_id
        assert f"UNREACHABLE data port of {member}" not in table.stdout
