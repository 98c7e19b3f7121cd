"""Joining needs the shared secret: a wrong one is refused, logged on both sides,
and costs the world nothing."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import (
    assert_bit_identical,
    hostport,
    log_size,
    peer_inputs,
    read_until_closed,
    running_peers,
    wait_for_log,
)

from collnet.membership import auth
from collnet.wire import FrameKind, FrameReader, frame_bytes

pytestmark = pytest.mark.timeout(60)


def _secret(path: Path) -> Path:
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def _works(p: object) -> None:
    inputs = peer_inputs(2, 5003, np.dtype(np.float32), "sum", seed=9)
    assert_bit_identical(p.all_reduce(inputs, op="sum", algo="ring"))  # type: ignore[attr-defined]


def test_members_with_the_secret_work_and_a_wrong_secret_is_refused_on_both_sides(
    tmp_path: Path,
) -> None:
    good = _secret(tmp_path / "good.key")
    bad = _secret(tmp_path / "bad.key")
    with running_peers(2, tmp_path / "c", secret_file=good) as p:
        _works(p)
        cluster = p.cluster
        coord_log = cluster.dir / "coordinator.log"
        since = log_size(coord_log)
        cluster.extra_args = ["--secret-file", str(bad)]  # the last --secret-file wins
        with pytest.raises(RuntimeError, match="exited"):
            cluster.add_daemon()
        intruder_log = cluster.dir / f"daemon{len(cluster.daemons) - 1}.log"
        assert "does not hold the same shared secret" in intruder_log.read_text()
        wait_for_log(coord_log, ["AuthError", "does not hold the same shared secret"], since)
        assert p.comms[0].world.pending == ()
        _works(p)


def test_daemon_without_a_secret_cannot_join_a_secret_world(tmp_path: Path) -> None:
    good = _secret(tmp_path / "good.key")
    with running_peers(2, tmp_path / "c", secret_file=good) as p:
        cluster = p.cluster
        cluster.secret_file = None
        with pytest.raises(RuntimeError, match="exited"):
            cluster.add_daemon()
        log = (cluster.dir / f"daemon{len(cluster.daemons) - 1}.log").read_text()
        assert "no shared secret" in log
        _works(p)


def test_data_link_with_a_forged_proof_is_closed_and_the_world_is_unaffected(
    tmp_path: Path,
) -> None:
    good = _secret(tmp_path / "good.key")
    with running_peers(2, tmp_path / "c", secret_file=good) as p:
        victim = p.cluster.daemons[0]
        log = p.cluster.dir / "daemon0.log"
        since = log_size(log)
        wrong = auth.Initiator(b"not-the-secret-at-all-0123456789")
        with socket.create_connection(hostport(victim.data), timeout=10) as sock:
            sock.sendall(
                frame_bytes(FrameKind.HELLO, wrong.hello({"peer": "zz", "conn": 0, "k": 2}))
            )
            reader = FrameReader()
            frames: list[object] = []
            while not frames:
                frames = reader.feed(sock.recv(65536))
            final, verdict = wrong.on_answer(frames[0].meta, "victim")  # type: ignore[attr-defined]
            assert verdict is not None  # we can tell the victim holds another secret
            sock.sendall(frame_bytes(FrameKind.HELLO, final))
            sock.sendall(frame_bytes(FrameKind.DATA, [1, 1, 0, 0, 0, 0, 4], b"evil"))
            read_until_closed(sock)
        wait_for_log(log, ["AuthError", "does not hold the same shared secret"], since)
        _works(p)
