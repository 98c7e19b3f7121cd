"""The coordinator keeps only soft state: killed and restarted, it loses no peer."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import assert_bit_identical, peer_inputs, run_on_all, running_peers, wait_until

pytestmark = pytest.mark.timeout(90)


def test_coordinator_killed_and_restarted_loses_no_peer_and_no_epoch(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as p:
        before = p.comms[0].world
        cluster = p.cluster
        cluster.restart_coordinator()
        # Collectives need no coordinator: they go on while it is away and after.
        inputs = peer_inputs(3, 5003, np.dtype(np.float32), "sum", seed=3)
        assert_bit_identical(p.all_reduce(inputs, op="sum", algo="ring"))

        def rebuilt() -> bool:
            try:
                w = p.comms[1].world
            except Exception:
                return False
            return w.peers == before.peers

        wait_until(rebuilt, 15.0, "the restarted coordinator to recover the world")
        world = p.comms[2].world
        assert world.epoch == before.epoch and world.peers == before.peers
        assert all(d.proc.poll() is None for d in cluster.daemons)
        # Membership works again: a joiner is admitted at the next update_topology.
        joiner = cluster.add_daemon()
        p.comms.append(p.connect(joiner.index))
        worlds = p.sync_world()
        assert {w.size for w in worlds} == {4} and {w.epoch for w in worlds} == {before.epoch + 1}
        inputs = peer_inputs(4, 7919, np.dtype(np.float32), "sum", seed=5)
        assert_bit_identical(p.all_reduce(inputs, op="sum"))


def test_coordinator_restart_loses_no_revision_of_the_shared_state(tmp_path: Path) -> None:
    """Revisions live with the peers: after a restart the next sync finds them all,
    and a joiner still gets the newest state."""
    rng = np.random.default_rng(8)
    model = {"w": rng.standard_normal(4099).astype(np.float32), "step": np.array([12])}
    with running_peers(3, tmp_path) as p:
        states = [{k: v.copy() for k, v in model.items()} for _ in range(3)]
        results = run_on_all(p.comms, lambda r, c: c.sync_state(states[r], 12))
        assert all(res.in_parity and res.revision == 12 for res in results)
        before = p.comms[0].world
        p.cluster.restart_coordinator()

        def rebuilt() -> bool:
            try:
                return p.comms[1].world.peers == before.peers
            except Exception:
                return False

        wait_until(rebuilt, 15.0, "the restarted coordinator to recover the world")
        joiner = p.cluster.add_daemon()
        p.comms.append(p.connect(joiner.index))
        assert {w.size for w in p.sync_world()} == {4}
        states.append({k: np.zeros_like(v) for k, v in model.items()})
        results = run_on_all(p.comms, lambda r, c: c.sync_state(states[r], 12 if r < 3 else 0))
        assert all(res.in_parity and res.revision == 12 for res in results)
        assert results[3].fetched == ("step", "w")
        for state in states:
            assert all(np.array_equal(state[k], model[k]) for k in model)


def test_update_topology_waits_through_a_coordinator_restart(tmp_path: Path) -> None:
    """Trainers in (or entering) the barrier while the coordinator is down are not
    failed: their daemons reconnect and the barrier completes."""
    with running_peers(3, tmp_path) as p:
        before = p.comms[0].world
        with ThreadPoolExecutor(3) as pool:
            # A restart takes a moment: some calls land before the kill, some while
            # the coordinator is down, all finish after it is back.
            calls = [pool.submit(c.update_topology, 40.0) for c in p.comms[:2]]
            time.sleep(0.3)
            p.cluster.restart_coordinator()
            calls.append(pool.submit(p.comms[2].update_topology, 40.0))
            worlds = [f.result(timeout=60) for f in calls]
        assert {w.peers for w in worlds} == {before.peers}
        assert {w.epoch for w in worlds} == {before.epoch}
        inputs = peer_inputs(3, 999, np.dtype(np.float32), "sum", seed=9)
        assert_bit_identical(p.all_reduce(inputs, op="sum"))


def test_state_sync_rides_through_a_coordinator_restart(tmp_path: Path) -> None:
    """A sync whose barrier is in flight when the coordinator restarts calls it
    again once reconnected (same world), instead of failing the trainers."""
    model = {"w": np.arange(1 << 16, dtype=np.float32)}
    with running_peers(3, tmp_path) as p:
        states = [{"w": model["w"].copy()} for _ in range(2)] + [
            {"w": np.zeros(1 << 16, np.float32)}
        ]
        with ThreadPoolExecutor(3) as pool:
            calls = [
                pool.submit(c.sync_state, states[r], 2, 40.0) for r, c in enumerate(p.comms[:2])
            ]
            time.sleep(0.3)  # those two wait at the barrier for the third
            p.cluster.restart_coordinator()
            calls.append(pool.submit(p.comms[2].sync_state, states[2], 0, 40.0))
            results = [f.result(timeout=60) for f in calls]
        assert all(r.in_parity and r.revision == 2 for r in results)
        assert np.array_equal(states[2]["w"], model["w"])
