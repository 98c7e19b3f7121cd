"""Shared-memory segments: the daemon unmaps what a closed client created."""

from __future__ import annotations

import time
from pathlib import Path

import collnet_client
import numpy as np
import pytest
from cluster_harness import run_on_all, running_peers, wait_until
from collnet_client import Comm

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
            names = [seg.name for seg, _ in comm.memory.segments.values()]
            names += [seg.name for seg, _ in comm.memory.pool]
            assert len(names) == 2
            assert all(name in _maps(daemon.proc.pid) for name in names)
            del arr
        wait_until(
            lambda: not any(name in _maps(daemon.proc.pid) for name in names),
            10.0,
            "daemon unmapping the closed client's segments",
        )
        assert not any(Path("/dev/shm", name).exists() for name in names)


def _join_until_both_are_members(rank: int, comm: Comm) -> None:
    # The first daemon to register again may start a world alone (as any first
    # peer does); the other is admitted at its next update_topology.
    while comm.update_topology(timeout_s=30.0).size < 2:
        pass


def test_a_new_client_session_reuses_default_tags_without_hanging(tmp_path: Path) -> None:
    with running_peers(2, tmp_path) as p:
        for session in range(2):
            p.close()
            p.comms = [p.connect(i) for i in range(2)]
            # Their trainers gone, the daemons left the world: the new ones join again.
            run_on_all(p.comms, _join_until_both_are_members)
            for step in range(2):
                # default tags: every new Comm counts them from 1 again
                def one(rank: int, comm: Comm, s: int = session + step) -> np.ndarray:
                    buf = np.full(300_000, rank + s, np.float32)
                    if rank == 1:
                        time.sleep(0.3)  # rank 0's data must arrive before rank 1 starts
                    return comm.all_reduce(buf, algo="ring", timeout_s=10.0)

                expected = np.full(300_000, 1 + 2 * (session + step), np.float32)
                assert all(np.array_equal(r, expected) for r in run_on_all(p.comms, one))
