"""Shared-memory segments: the daemon unmaps what a closed client created."""

from __future__ import annotations

from pathlib import Path

import collnet_client
import numpy as np
import pytest
from cluster_harness import running_peers, wait_until

pytestmark = pytest.mark.timeout(60)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_daemon_unmaps_a_closed_clients_segments(tmp_path: Path) -> None:
    with running_peers(1, tmp_path) as p:
        daemon = p.cluster.daemons[0]
        with collnet_client.connect(daemon.ipc, timeout_s=30) as comm:
            arr = comm.empty(4096, np.float32)
            arr[:] = 2.0
            comm.all_reduce(arr, tag="shm-1")
            staged = np.ones(1000, np.float32)
            comm.all_reduce(staged, tag="shm-2")
            names = [seg.name for seg, _ in comm._segments.values()]
            names += [seg.name for seg, _ in comm._staging]
            assert len(names) == 2
            assert all(name in _maps(daemon.proc.pid) for name in names)
            del arr
        wait_until(
            lambda: not any(name in _maps(daemon.proc.pid) for name in names),
            10.0,
            "daemon unmapping the closed client's segments",
        )
        assert not any(Path("/dev/shm", name).exists() for name in names)
