"""Connections per link over real daemons: auto, forced and mixed K on loopback.

The dialler of a link (the peer whose id sorts first) chooses its K and the
acceptor takes it. What the kernel holds is the proof: the established TCP
connections a daemon process owns towards another daemon's data port
(``ss -tnp``), counted after an all-reduce that needed every link.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import (
    Peers,
    assert_bit_identical,
    assert_matches_reference,
    peer_inputs,
    running_peers,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)"),
]


def _connections(peers: Peers, dialler: int, acceptor: int) -> int:
    """Established connections ``dialler``'s process holds to ``acceptor``'s data port."""
    port = peers.cluster.daemons[acceptor].data.rsplit(":", 1)[1]
    pid = peers.cluster.daemons[dialler].proc.pid
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", "(", "dport", "=", f":{port}", ")"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if re.search(rf"pid={pid}\b", line))


def _reduce_and_check(peers: Peers, seed: int) -> None:
    # 24 MiB: the ring's segments are big enough to be striped over every connection.
    inputs = peer_inputs(peers.size, 6 << 20, np.dtype(np.float32), "sum", seed)
    results = peers.all_reduce(inputs, algo="ring")
    assert_bit_identical(results)
    assert_matches_reference(results, inputs, "sum")


def test_auto_dials_one_connection_per_loopback_link(tmp_path: Path) -> None:
    with running_peers(3, tmp_path, extra_args=["--connections", "auto"]) as peers:
        _reduce_and_check(peers, 1)
        assert [_connections(peers, 0, 1), _connections(peers, 0, 2)] == [1, 1]
        assert _connections(peers, 1, 2) == 1
        # Nobody dials the other way: the smaller id dials each pair.
        assert _connections(peers, 2, 0) == 0


def test_a_forced_k_dials_k_connections(tmp_path: Path) -> None:
    with running_peers(3, tmp_path, connections=3) as peers:
        _reduce_and_check(peers, 2)
        assert [_connections(peers, 0, 1), _connections(peers, 0, 2)] == [3, 3]
        assert _connections(peers, 1, 2) == 3


def test_peers_with_different_k_link_with_the_diallers_choice(tmp_path: Path) -> None:
    # peer00 forces 2, peer01 forces 5, peer02 is auto (1 on loopback, but it
    # dials nobody: its id sorts last).
    with running_peers(1, tmp_path, connections=2, admit=False) as peers:
        cluster = peers.cluster
        for k in ("5", "auto"):
            cluster.extra_args = ["--connections", k]
            cluster.add_daemon()
            peers.comms.append(peers.connect(len(peers.comms)))
        assert {w.size for w in peers.sync_world()} == {3}
        _reduce_and_check(peers, 3)
        assert [_connections(peers, 0, 1), _connections(peers, 0, 2)] == [2, 2]
        assert _connections(peers, 1, 2) == 5
        # A second all-reduce over the same links: nothing was re-made.
        _reduce_and_check(peers, 4)
        assert _connections(peers, 1, 2) == 5
