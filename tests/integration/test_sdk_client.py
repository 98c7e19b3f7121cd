"""The SDK over real daemons: torch tensors, handles, cancel, retry, error feedback,
and a daemon that dies under a waiting trainer."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import collnet_client
import numpy as np
import pytest
from cluster_harness import (
    CALL_TIMEOUT_S,
    Peers,
    assert_bit_identical,
    fresh_tag,
    run_on_all,
    run_on_all_outcomes,
    running_peers,
    wait_until,
)
from collnet_client import (
    CollectiveAborted,
    Comm,
    DaemonUnavailable,
    InvalidArgument,
    PeerLost,
    Timeout,
    WaitTimeout,
)

pytestmark = pytest.mark.timeout(90)

WORLD = 3


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    with running_peers(WORLD, tmp_path_factory.mktemp("sdk")) as p:
        yield p


def _inputs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, n).astype(np.float32) for _ in range(WORLD)]


def test_torch_cpu_tensors_are_reduced_in_place_like_numpy(peers: Peers) -> None:
    torch = pytest.importorskip("torch")
    inputs = _inputs(70_001, seed=3)
    tag = fresh_tag()

    def one(rank: int, comm: Comm) -> tuple[Any, Any]:
        plain = torch.from_numpy(inputs[rank].copy())
        out = comm.all_reduce(plain, op="sum", tag=f"{tag}a", timeout_s=CALL_TIMEOUT_S)
        assert out is plain
        # Over SDK memory: reduced where it lies, no staging segment involved.
        shared = torch.from_numpy(comm.empty(inputs[rank].shape, np.float32))
        shared.copy_(torch.from_numpy(inputs[rank]))
        comm.all_reduce(shared, op="sum", tag=f"{tag}b", timeout_s=CALL_TIMEOUT_S)
        assert comm.memory.locate(shared.numpy()) is not None
        return plain.clone(), shared.clone()

    results = run_on_all(peers.comms, one)
    ref = np.sum(np.stack(inputs).astype(np.float64), axis=0)
    for plain, shared in results:
        np.testing.assert_allclose(plain.numpy(), ref, atol=1e-5)
        assert torch.equal(plain, shared)
    assert_bit_identical([p.numpy() for p, _ in results])


def test_torch_bfloat16_and_strided_tensors(peers: Peers) -> None:
    torch = pytest.importorskip("torch")
    tag = fresh_tag()

    def one(rank: int, comm: Comm) -> tuple[Any, Any]:
        bf = torch.full((513,), float(rank + 1), dtype=torch.bfloat16)
        comm.all_reduce(bf, op="max", tag=f"{tag}a", timeout_s=CALL_TIMEOUT_S)
        # A transposed view has no contiguous host bytes: staged, written back in place.
        grid = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (rank + 1)
        view = grid.t()
        comm.all_reduce(view, op="sum", tag=f"{tag}b", timeout_s=CALL_TIMEOUT_S)
        return bf.clone(), grid.clone()

    for bf, grid in run_on_all(peers.comms, one):
        assert bf.dtype == torch.bfloat16 and torch.all(bf == float(WORLD))
        expected = torch.arange(12, dtype=torch.float32).reshape(3, 4) * sum(range(1, WORLD + 1))
        assert torch.equal(grid, expected)


def test_torch_dtype_without_a_reduction_is_refused(peers: Peers) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(InvalidArgument, match="complex"):
        peers.comms[0].all_reduce(torch.zeros(4, dtype=torch.complex64), tag=fresh_tag())


def test_several_handles_in_flight_complete_independently(peers: Peers) -> None:
    tag = fresh_tag()
    sizes = [10, 300_000, 1 << 20, 7]

    def one(rank: int, comm: Comm) -> list[np.ndarray]:
        bufs = [np.full(n, float(rank + i), np.float32) for i, n in enumerate(sizes)]
        handles = [
            comm.all_reduce_async(b, op="sum", tag=f"{tag}-{i}", timeout_s=CALL_TIMEOUT_S)
            for i, b in enumerate(bufs)
        ]
        # Waited in reverse order: each reply is routed to its own handle.
        for h, b in zip(reversed(handles), reversed(bufs), strict=True):
            assert h.wait() is b and h.done()
        return bufs

    base = sum(range(WORLD))
    for bufs in run_on_all(peers.comms, one):
        for i, b in enumerate(bufs):
            assert np.all(b == base + WORLD * i)


def test_a_wait_that_times_out_leaves_the_collective_running(peers: Peers) -> None:
    tag = fresh_tag()

    def one(rank: int, comm: Comm) -> np.ndarray:
        buf = np.full(1000, float(rank), np.float32)
        if rank != 0:
            wait_until(lambda: started[0], 30, "rank 0's first wait")
        h = comm.all_reduce_async(buf, tag=tag, timeout_s=CALL_TIMEOUT_S)
        if rank == 0:
            # Nobody else has started: this wait gives up, the collective goes on.
            with pytest.raises(WaitTimeout):
                h.wait(timeout_s=0.2)
            assert not h.done()
            started[0] = True
        out: np.ndarray = h.wait()
        return out

    started = [False]
    for out in run_on_all(peers.comms, one):
        assert np.all(out == sum(range(WORLD)))


def test_closing_a_comm_frees_the_staging_of_requests_never_waited_for(peers: Peers) -> None:
    comm = peers.connect(0)
    # Only this peer calls it: it stays pending until its (short) deadline.
    comm.all_reduce_async(np.ones(1000, np.float32), tag=fresh_tag(), timeout_s=2.0)
    names = list(comm.memory.staging_made)
    assert len(names) == 1 and Path("/dev/shm", names[0]).exists()
    comm.close()
    assert not Path("/dev/shm", names[0]).exists()


def test_cancel_aborts_the_collective_on_every_peer(peers: Peers) -> None:
    tag = fresh_tag()
    started = [False] * WORLD

    def one(rank: int, comm: Comm) -> Any:
        # Rank 2 joins only after the cancel, so the collective cannot finish first.
        if rank == 2:
            wait_until(lambda: started[0] and started[1], 30, "ranks 0 and 1 starting")
            return comm.all_reduce(np.ones(1000, np.float32), tag=tag, timeout_s=CALL_TIMEOUT_S)
        h = comm.all_reduce_async(np.ones(1000, np.float32), tag=tag, timeout_s=CALL_TIMEOUT_S)
        if rank == 0:
            assert h.cancel() is True
            started[0] = True
            with pytest.raises(CollectiveAborted, match="cancelled"):
                h.wait()
            return "cancelled"
        started[1] = True
        return h.wait()

    outcomes = run_on_all_outcomes(peers.comms, one)
    assert outcomes[0] == "cancelled"
    assert isinstance(outcomes[1], CollectiveAborted), outcomes
    assert isinstance(outcomes[2], CollectiveAborted), outcomes
    inputs = _inputs(100, seed=5)
    results = peers.all_reduce(inputs, op="sum")
    assert_bit_identical(results)


def test_error_feedback_keeps_quantization_error_from_accumulating(peers: Peers) -> None:
    steps, n = 24, 4096
    inputs = _inputs(n, seed=11)
    exact = np.mean(np.stack(inputs).astype(np.float64), axis=0) * steps

    def run(feedback: bool) -> list[np.ndarray]:
        tag = fresh_tag("ef")

        def one(rank: int, comm: Comm) -> np.ndarray:
            buf = comm.empty(n, np.float32)
            total = np.zeros(n, np.float64)
            for step in range(steps):
                np.copyto(buf, inputs[rank])
                comm.all_reduce(
                    buf,
                    op="avg",
                    codec="uint4",
                    tag=f"{tag}-{step}",
                    error_feedback=feedback,
                    feedback_key="grad",
                    timeout_s=CALL_TIMEOUT_S,
                )
                total += buf
            comm.feedback.forget()
            return total

        return run_on_all(peers.comms, one)

    plain = max(float(np.max(np.abs(t - exact))) for t in run(False))
    fed = max(float(np.max(np.abs(t - exact))) for t in run(True))
    # Without feedback the same rounding repeats every step and the sum drifts.
    assert fed < plain / 3, (fed, plain)


def test_a_failed_collective_leaves_the_error_feedback_residual_as_it_was(peers: Peers) -> None:
    comm = peers.comms[0]
    x = np.random.default_rng(2).uniform(-1, 1, 4096).astype(np.float32)
    # Only this peer calls it: it fails at its deadline, having sent nothing.
    with pytest.raises(Timeout) as info:
        comm.all_reduce(x, codec="uint4", tag=fresh_tag(), timeout_s=0.5,
                        error_feedback=True, feedback_key="undo")  # fmt: skip
    assert not isinstance(info.value, WaitTimeout)  # the daemon's verdict, not a wait's
    assert info.value.buffer_modified is False  # staged: never written back
    assert not np.any(comm.feedback.residuals["undo"])
    comm.feedback.forget("undo")


def test_error_feedback_on_an_integer_tensor_is_refused(peers: Peers) -> None:
    with pytest.raises(InvalidArgument, match="float32"):
        peers.comms[0].all_reduce(
            np.ones(8, np.int32), codec="uint8", error_feedback=True, tag=fresh_tag()
        )


def test_daemon_killed_under_a_waiting_trainer_fails_fast_with_daemon_unavailable(
    tmp_path: Path,
) -> None:
    with running_peers(2, tmp_path) as p:
        comm, victim = p.comms[0], p.cluster.daemons[0]
        # Rank 1 never joins: only the daemon's death can end this wait early.
        handle = comm.all_reduce_async(np.ones(100, np.float32), tag=fresh_tag(), timeout_s=120)
        p.cluster.kill(victim, signal.SIGKILL)
        victim.proc.wait(10)
        with pytest.raises(DaemonUnavailable, match="killed"):
            handle.wait(timeout_s=60)
        with pytest.raises(DaemonUnavailable):
            comm.update_topology(timeout_s=60)
        # Its socket file is still there, but a new connection is refused at once
        # rather than after the hello timeout.
        with pytest.raises(DaemonUnavailable, match="nothing accepts connections"):
            collnet_client.connect(victim.ipc, timeout_s=60)


def test_retry_reruns_a_collective_in_the_shrunken_world(tmp_path: Path) -> None:
    with running_peers(3, tmp_path) as p:
        survivors = p.comms[:2]
        tag = fresh_tag()
        inputs = [np.full(50_000, float(r + 1), np.float32) for r in range(2)]

        def one(rank: int, comm: Comm) -> tuple[np.ndarray, int]:
            buf = comm.empty(50_000, np.float32)
            np.copyto(buf, inputs[rank])
            if rank == 0:
                # Peer 2 never joins; its death is what fails the first attempt.
                p.cluster.kill(p.cluster.daemons[2], signal.SIGKILL)
            comm.all_reduce(buf, op="sum", tag=tag, retry=1, timeout_s=CALL_TIMEOUT_S)
            return np.array(buf), comm.world.size

        for buf, size in run_on_all(survivors, one):
            assert size == 2
            assert np.all(buf == 3.0)


def test_without_retry_peer_loss_is_raised(tmp_path: Path) -> None:
    with running_peers(2, tmp_path) as p:
        handle = p.comms[0].all_reduce_async(
            p.comms[0].zeros(10), tag=fresh_tag(), timeout_s=CALL_TIMEOUT_S
        )
        p.cluster.kill(p.cluster.daemons[1], signal.SIGKILL)
        with pytest.raises(PeerLost, match=p.cluster.daemons[1].peer_id):
            handle.wait()


_TRAINER = """
import sys, time, collnet_client
comm = collnet_client.connect(sys.argv[1], timeout_s=60)
comm.update_topology()
print("joined", flush=True)
time.sleep(600)
"""


def test_a_killed_trainer_takes_its_daemon_out_of_the_world_when_asked(tmp_path: Path) -> None:
    # --leave-when-trainers-exit: the others are not held at the next barrier.
    flag = ["--leave-when-trainers-exit"]
    with running_peers(2, tmp_path, extra_args=flag, admit=False) as p:
        survivor, victim = p.comms[0], p.cluster.daemons[1]
        trainer = subprocess.Popen(
            [sys.executable, "-c", _TRAINER, victim.ipc], stdout=subprocess.PIPE, text=True
        )
        try:
            world = survivor.update_topology(timeout_s=CALL_TIMEOUT_S)
            assert trainer.stdout is not None and trainer.stdout.readline().strip() == "joined"
            assert world.size == 2
            trainer.send_signal(signal.SIGKILL)
            trainer.wait(10)
            # Daemon 1 leaves gracefully and exits: the survivor's barrier goes on alone.
            world = survivor.update_topology(timeout_s=CALL_TIMEOUT_S)
            assert world.peers == (survivor.peer_id,)
            assert victim.proc.wait(30) == 0
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait()
