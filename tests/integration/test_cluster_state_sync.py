"""Shared-state sync over real daemons: joiners and diverged peers reach bit parity.

Each test states the world's state per peer, calls ``sync_state`` on every
peer at once, and checks the tensors byte for byte against the reference the
sync must choose (the majority at the newest revision).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import (
    CALL_TIMEOUT_S,
    Peers,
    run_on_all,
    run_on_all_outcomes,
    running_peers,
)
from collnet_client import CollnetError, Comm, InvalidArgument, MismatchError, PeerLost, SyncResult

from collnet.state import tensor_digest

pytestmark = pytest.mark.timeout(120)

# Heartbeat floor 2 s (default) plus one detection round: a frozen peer is
# declared lost within this (as in tests/integration/test_cluster_crash.py).
FREEZE_BOUND_S = 6.0


def model(seed: int, scale: int = 1) -> dict[str, np.ndarray]:
    """A small 'model': tensors of several dtypes and shapes, one of them empty."""
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((64 * scale, 33)).astype(np.float32),
        "block.0.w": rng.standard_normal((17, 5)).astype(np.float16),
        "block.0.b": rng.integers(-9, 9, 40).astype(np.int64),
        "opt.step": np.array(seed, np.int32),
        "empty": np.zeros((0, 3), np.float32),
    }


def digests(state: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: tensor_digest(arr) for name, arr in state.items()}


def sync_all(
    comms: list[Comm], states: list[dict[str, np.ndarray]], revisions: list[int]
) -> list[SyncResult]:
    return run_on_all(
        comms,
        lambda r, c: c.sync_state(states[r], revisions[r], timeout_s=CALL_TIMEOUT_S),
    )


def test_states_already_equal_move_no_bytes_and_report_parity(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as peers:
        states = [model(1) for _ in range(3)]
        results = sync_all(peers.comms, states, [7, 7, 7])
        for res in results:
            assert res.in_parity and res.revision == 7 and res.peers == 3
            assert res.fetched == () and res.bytes_fetched == 0
        assert len({r.state_digest for r in results}) == 1
        for state in states:
            assert digests(state) == digests(model(1))


def test_a_diverged_peer_fetches_only_what_differs_from_the_majority(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as peers:
        states = [model(1) for _ in range(3)]
        states[2]["embed.weight"][5, 7] += 1.0  # one flipped value, same revision
        results = sync_all(peers.comms, states, [3, 3, 3])
        assert results[2].fetched == ("embed.weight",)
        assert set(results[2].sources) <= {peers.comms[0].peer_id, peers.comms[1].peer_id}
        assert results[0].fetched == results[1].fetched == ()
        assert all(r.in_parity for r in results)
        for state in states:
            assert digests(state) == digests(model(1))


def test_the_newest_revision_wins_even_when_held_by_one_peer(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as peers:
        states = [model(1), model(1), model(2)]
        results = sync_all(peers.comms, states, [4, 4, 5])
        assert all(r.revision == 5 and r.in_parity for r in results)
        assert results[0].sources == (peers.comms[2].peer_id,)
        # opt.step differs too, and the empty tensor needs no bytes
        assert set(results[0].fetched) == {"embed.weight", "block.0.w", "block.0.b", "opt.step"}
        for state in states:
            assert digests(state) == digests(model(2))


def test_zero_copy_state_in_shared_memory(tmp_path: Path) -> None:
    with running_peers(2, tmp_path) as peers:
        states = []
        for rank, comm in enumerate(peers.comms):
            src = model(10 + rank)
            shm = {name: comm.empty(arr.shape, arr.dtype) for name, arr in src.items()}
            for name, arr in src.items():
                np.copyto(shm[name], arr)
            states.append(shm)
        results = sync_all(peers.comms, states, [1, 2])
        assert results[0].revision == 2 and results[0].bytes_fetched > 0
        assert digests(states[0]) == digests(states[1]) == digests(model(11))


def test_different_declarations_fail_on_every_peer_never_hang(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as peers:
        states = [model(1) for _ in range(3)]
        states[1]["block.0.w"] = states[1]["block.0.w"].reshape(5, 17)
        outcomes = run_on_all_outcomes(
            peers.comms, lambda r, c: c.sync_state(states[r], 1, timeout_s=CALL_TIMEOUT_S)
        )
        for out in outcomes:
            assert isinstance(out, MismatchError), out
            assert "block.0.w" in str(out)
        # The world is unharmed: a consistent sync works right after.
        states[1] = model(1)
        assert all(r.in_parity for r in sync_all(peers.comms, states, [1, 1, 1]))


def test_joiner_into_a_world_of_four_gets_256_mib_from_several_holders(tmp_path: Path) -> None:
    """The issue's bar: 256 MiB of state, bit-identical on the joiner, striped."""
    mib = 1 << 20
    shapes = {f"layer{i}": (16 * mib) // 4 for i in range(16)}  # 16 x 16 MiB float32

    def fill(comm: Comm, seed: int | None) -> dict[str, np.ndarray]:
        state = {}
        for i, (name, n) in enumerate(shapes.items()):
            arr = comm.empty(n, np.float32)
            if seed is None:
                arr.fill(0)  # a joiner's fresh, untrained model
            else:
                arr[:] = np.arange(n, dtype=np.float32) * (i + 1) + seed
            state[name] = arr
        return state

    with running_peers(4, tmp_path) as peers:
        states = [fill(c, 0) for c in peers.comms]
        assert all(r.in_parity for r in sync_all(peers.comms, states, [9] * 4))
        peers.cluster.add_daemon()
        joiner = peers.connect(4)
        everyone = [*peers.comms, joiner]
        peers.comms.append(joiner)
        worlds = Peers(peers.cluster, everyone).sync_world()
        assert {w.size for w in worlds} == {5}
        states.append(fill(joiner, None))
        results = sync_all(everyone, states, [9, 9, 9, 9, 0])
        got = results[4]
        assert got.bytes_fetched == 256 * mib and set(got.fetched) == set(shapes)
        assert len(got.sources) > 1, "the joiner must pull from more than one holder"
        assert all(r.in_parity and r.revision == 9 for r in results)
        expected = digests(states[0])
        for state in states[1:]:
            assert digests(state) == expected


def test_a_holder_frozen_mid_transfer_fails_the_sync_everywhere_then_a_retry_succeeds(
    tmp_path: Path,
) -> None:
    """SIGSTOP a holder as soon as the joiner's first fetched bytes land: every
    member fails with PeerLost within the freeze bound; after update_topology
    the survivors and the joiner sync again and reach parity."""
    mib = 1 << 20
    names = [f"layer{i}" for i in range(8)]
    n = (16 * mib) // 4

    def fill(comm: Comm, fresh: bool) -> dict[str, np.ndarray]:
        state = {}
        for i, name in enumerate(names):
            arr = comm.empty(n, np.float32)
            arr[:] = 0 if fresh else np.arange(n, dtype=np.float32) * (i + 1) + 1
            state[name] = arr
        return state

    with running_peers(3, tmp_path) as peers:
        states = [fill(c, False) for c in peers.comms]
        peers.cluster.add_daemon()
        joiner = peers.connect(3)
        peers.comms.append(joiner)
        assert {w.size for w in peers.sync_world()} == {4}
        states.append(fill(joiner, True))
        # Nearly all of every tensor comes from another holder than its first
        # range's, so watching every tensor's first bytes sees the first landing.
        firsts = [states[3][name][:4] for name in names]
        victim = 1
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(c.sync_state, states[r], 3 if r < 3 else 0, timeout_s=60.0)
                for r, c in enumerate(peers.comms)
            ]
            while not any(f.any() for f in firsts):
                assert time.monotonic() - started < 30, "the joiner never received a byte"
                time.sleep(0.001)
            os.kill(peers.cluster.daemons[victim].proc.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                for r in (0, 2, 3):  # the victim's own client waits for its daemon
                    exc = futures[r].exception(timeout=FREEZE_BOUND_S + 5)
                    assert isinstance(exc, PeerLost), (r, exc)
                    assert time.monotonic() - frozen_at < FREEZE_BOUND_S + 2, (r, exc)
            finally:
                os.kill(peers.cluster.daemons[victim].proc.pid, signal.SIGKILL)
            assert isinstance(futures[victim].exception(timeout=30), CollnetError)
        survivors = [peers.comms[r] for r in (0, 2, 3)]
        left = [states[r] for r in (0, 2, 3)]
        assert {w.size for w in Peers(peers.cluster, survivors).sync_world()} == {3}
        results = sync_all(survivors, left, [3, 3, 0])
        assert all(r.in_parity and r.revision == 3 for r in results)
        assert results[2].bytes_fetched > 0
        expected = digests(fill_reference(names, n))
        for state in left:
            assert digests(state) == expected


def fill_reference(names: list[str], n: int) -> dict[str, np.ndarray]:
    return {name: np.arange(n, dtype=np.float32) * (i + 1) + 1 for i, name in enumerate(names)}


def test_a_peer_refusing_its_own_request_fails_every_member_at_once(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as peers:
        states = [model(1) for _ in range(3)]
        states[1] = {"": np.zeros(3, np.float32)}  # no valid tensor name
        started = time.monotonic()
        outcomes = run_on_all_outcomes(
            peers.comms, lambda r, c: c.sync_state(states[r], 1, timeout_s=30.0)
        )
        assert time.monotonic() - started < 10, "members waited for the refusing peer"
        for out in outcomes:
            assert isinstance(out, InvalidArgument), out
        assert peers.comms[1].peer_id in str(outcomes[0])
        states[1] = model(1)
        assert all(r.in_parity for r in sync_all(peers.comms, states, [1, 1, 1]))
