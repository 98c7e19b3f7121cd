"""Membership over real processes: joining at agreed points, graceful leave.

These tests change the world, so each gets its own small cluster.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import collnet_client
import numpy as np
import pytest
from cluster_harness import (
    CALL_TIMEOUT_S,
    Peers,
    assert_bit_identical,
    assert_matches_reference,
    fresh_tag,
    peer_inputs,
    running_peers,
    wait_until,
)
from collnet_client import Comm, PeerLost

pytestmark = pytest.mark.timeout(60)

# A graceful exit (announce the leave, close links) must take no longer than this.
EXIT_BOUND_S = 5.0


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    with running_peers(2, tmp_path) as p:
        yield p


def _check_all_reduce(comms: list[Comm], peers: Peers) -> None:
    view = Peers(peers.cluster, list(comms))
    inputs = peer_inputs(len(comms), 7919, np.dtype(np.float32), "sum", seed=4)
    for algo in ("ring", "star"):
        results = view.all_reduce(inputs, op="sum", algo=algo)
        assert_matches_reference(results, inputs, "sum")
        assert_bit_identical(results)


def _survivors_move_to_the_new_epoch(survivors: list[Comm], peers: Peers, gone: str) -> None:
    """Collectives run in the epoch a trainer agreed to at update_topology: one
    issued in the old epoch fails at once with PeerLost naming who left, and after
    update_topology (every outer step of a training loop) the survivors carry on."""
    with pytest.raises(PeerLost, match="update_topology") as info:
        survivors[0].all_reduce(np.ones(4, np.float32), tag=fresh_tag(), timeout_s=5.0)
    assert info.value.peer == gone
    view = Peers(peers.cluster, list(survivors))
    assert {w.size for w in view.sync_world()} == {len(survivors)}
    _check_all_reduce(survivors, peers)


def _add_joiner(peers: Peers, peer_id: str | None = None) -> tuple[str, Comm]:
    """Start one more daemon (with ``peer_id`` if given) and connect to it."""
    cluster = peers.cluster
    saved = cluster.extra_args
    if peer_id is not None:  # a repeated option: the last --peer-id wins
        cluster.extra_args = [*saved, "--peer-id", peer_id]
    try:
        daemon = cluster.add_daemon()
    finally:
        cluster.extra_args = saved
    return daemon.peer_id, collnet_client.connect(daemon.ipc, timeout_s=CALL_TIMEOUT_S)


def test_daemon_added_later_is_pending_until_the_active_peers_update_topology(
    peers: Peers,
) -> None:
    before = peers.comms[0].world
    joiner_id, joiner = _add_joiner(peers)
    try:
        for comm in [*peers.comms, joiner]:
            world = comm.world
            assert world.pending == (joiner_id,)
            assert world.epoch == before.epoch and world.peers == before.peers

        # The joiner asks to be admitted; that alone changes nothing.
        with_joiner = update_topology_in_background(joiner)
        time.sleep(0.5)
        assert not with_joiner.done(), "the joiner was admitted before the active peers agreed"
        assert peers.comms[0].world.pending == (joiner_id,)
        # The old world keeps working while the joiner waits.
        _check_all_reduce(peers.comms, peers)

        worlds = [*peers.sync_world(), with_joiner.result(timeout=CALL_TIMEOUT_S)]
        for world in worlds:
            assert world.size == 3 and world.pending == ()
            assert world.epoch == before.epoch + 1
            assert world.peers == worlds[0].peers and joiner_id in world.peers
        _check_all_reduce([*peers.comms, joiner], peers)
    finally:
        joiner.close()


def test_joiner_not_yet_in_update_topology_does_not_stall_the_active_peers(
    peers: Peers,
) -> None:
    # The joiner's id sorts first, so by the mesh's rule it is the one that
    # must dial the others once it is admitted, even if it is not asking.
    joiner_id, joiner = _add_joiner(peers, peer_id="aaa-joiner")
    try:
        assert joiner.world.pending == (joiner_id,)
        started = time.monotonic()
        worlds = peers.sync_world()
        took = time.monotonic() - started
        assert all(w.size == 3 and joiner_id in w.peers for w in worlds), worlds
        assert took < 5.0, f"update_topology took {took:.1f}s with an idle joiner"
        assert joiner.update_topology(timeout_s=CALL_TIMEOUT_S).peers == worlds[0].peers
        _check_all_reduce([*peers.comms, joiner], peers)
    finally:
        joiner.close()


def test_sigterm_makes_a_daemon_leave_gracefully_and_exit_zero(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as peers:
        leaver = peers.cluster.daemons[2]
        before = peers.comms[0].world
        peers.comms[2].close()
        survivors = peers.comms[:2]

        started = time.monotonic()
        peers.cluster.kill(leaver, signal.SIGTERM)
        try:
            code = leaver.proc.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not exit within {EXIT_BOUND_S}s of SIGTERM")
        assert code == 0
        assert time.monotonic() - started < EXIT_BOUND_S

        # The coordinator announced the leave: every survivor's world drops it.
        for comm in survivors:
            wait_until(lambda c=comm: leaver.peer_id not in c.world.peers, 5.0, "the leave to show")
        world = survivors[0].world
        assert world.size == 2 and world.epoch == before.epoch + 1 and world.pending == ()
        log = (peers.cluster.workdir / f"daemon{leaver.index}.log").read_text()
        assert "could not announce leave" not in log

        _survivors_move_to_the_new_epoch(survivors, peers, leaver.peer_id)


def test_client_leave_removes_the_peer_from_the_world(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as peers:
        leaver = peers.cluster.daemons[2]
        peers.comms[2].leave()
        try:
            code = leaver.proc.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not exit within {EXIT_BOUND_S}s of a leave request")
        assert code == 0, "a requested leave is a graceful exit"
        survivors = peers.comms[:2]
        for comm in survivors:
            wait_until(lambda c=comm: leaver.peer_id not in c.world.peers, 5.0, "the leave to show")
        _survivors_move_to_the_new_epoch(survivors, peers, leaver.peer_id)


def update_topology_in_background(comm: Comm) -> Future[collnet_client.World]:
    """``comm.update_topology()`` in a background thread."""
    pool = ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(comm.update_topology, CALL_TIMEOUT_S)
    pool.shutdown(wait=False)
    return fut
