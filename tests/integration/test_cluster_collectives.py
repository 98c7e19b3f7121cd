"""Broadcast, all-gather(-v), reduce-scatter and barrier through real daemons.

One 3-peer cluster serves the module (sizes not divisible by 3 are the
interesting ones); the kill test builds its own. Results are checked against
numpy, bit for bit across ranks; hypothesis picks sizes, dtypes, roots and
codecs, with few examples since each one is a real collective.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cluster_harness import (
    CALL_TIMEOUT_S,
    DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    Peers,
    assert_bit_identical,
    fresh_tag,
    peer_inputs,
    reference,
    run_on_all,
    run_on_all_outcomes,
    running_peers,
)
from collnet_client import Comm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collnet.algo.reducescatter import output_range
from collnet.errors import CollectiveAborted, InvalidArgument, MismatchError, PeerLost

pytestmark = pytest.mark.timeout(120)

WORLD = 3
KILL_BOUND_S = 3.0  # as test_cluster_crash: kill -9 is seen through socket errors
# A disagreement is seen at the first message (an AGREE is sent at start), far
# below the 20 s deadline these tests give: a rank left waiting would show.
MISMATCH_BOUND_S = 5.0
FEW = settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
sizes = st.sampled_from([0, 1, 2, 1000, 7919, 300_001])
dtypes = st.sampled_from(DTYPES)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    with running_peers(WORLD, tmp_path_factory.mktemp("collectives")) as p:
        yield p


def _inputs(n: int, dtype: np.dtype[Any], seed: int) -> list[np.ndarray]:
    return peer_inputs(WORLD, n, dtype, "sum", seed=seed)


def test_rank_and_size_are_positions_in_the_agreed_world(peers: Peers) -> None:
    ranks = [c.rank for c in peers.comms]
    assert sorted(ranks) == list(range(WORLD))
    assert {c.size for c in peers.comms} == {WORLD}
    for comm in peers.comms:
        assert comm.world.peers[comm.rank] == comm.peer_id


@FEW
@given(
    n=sizes,
    dtype=dtypes,
    root=st.integers(0, WORLD - 1),
    algo=st.sampled_from(["auto", "chain", "star"]),
)
def test_broadcast_gives_every_rank_the_roots_tensor(
    peers: Peers, n: int, dtype: np.dtype[Any], root: int, algo: str
) -> None:
    inputs, tag = _inputs(n, dtype, seed=n + root), fresh_tag()

    def one(_: int, comm: Comm) -> np.ndarray:
        buf = inputs[comm.rank].copy()
        out = comm.broadcast(buf, root=root, algo=algo, tag=tag, timeout_s=CALL_TIMEOUT_S)
        assert out is buf
        return buf

    results = run_on_all(peers.comms, one)
    for res in results:
        assert res.tobytes() == inputs[root].tobytes()


@FEW
@given(n=sizes.filter(bool), dtype=st.sampled_from(FLOAT_DTYPES), root=st.integers(0, WORLD - 1))
def test_quantized_broadcast_is_bit_identical_on_every_rank_root_included(
    peers: Peers, n: int, dtype: np.dtype[Any], root: int
) -> None:
    inputs, tag = _inputs(n, dtype, seed=n), fresh_tag()

    def one(_: int, comm: Comm) -> np.ndarray:
        buf = comm.empty(n, dtype)  # in place, no staging
        buf[:] = inputs[comm.rank]
        comm.broadcast(buf, root=root, codec="uint8", tag=tag, timeout_s=CALL_TIMEOUT_S)
        return np.array(buf, copy=True)

    results = run_on_all(peers.comms, one)
    assert_bit_identical(results)
    err = np.max(np.abs(results[0].astype(np.float64) - inputs[root].astype(np.float64)))
    assert err <= 2.0 / 255 + 2.0 / 2**7  # one uint8 step of [-1, 1), and half precision


@FEW
@given(n=sizes, dtype=dtypes, codec=st.sampled_from(["none", "uint8"]))
def test_all_gather_holds_every_ranks_tensor_in_rank_order(
    peers: Peers, n: int, dtype: np.dtype[Any], codec: str
) -> None:
    if dtype in INT_DTYPES:
        codec = "none"  # quantizing codecs are for floats
    inputs, tag = _inputs(n, dtype, seed=n + 1), fresh_tag()

    def one(_: int, comm: Comm) -> np.ndarray:
        src = inputs[comm.rank].reshape(1, -1) if n else inputs[comm.rank]
        out = comm.all_gather(src, codec=codec, tag=tag, timeout_s=CALL_TIMEOUT_S)
        assert out.shape == (WORLD, *src.shape) and out.dtype == dtype
        return out

    results = run_on_all(peers.comms, one)
    assert_bit_identical(results)
    expected = np.stack(inputs).reshape(results[0].shape)
    if codec == "none":
        assert results[0].tobytes() == expected.tobytes()
    else:
        err = np.abs(results[0].astype(np.float64) - expected.astype(np.float64))
        assert float(np.max(err, initial=0.0)) <= 2.0 / 255 + 2.0 / 2**7


def test_all_gather_fills_a_given_output_in_shared_memory_and_torch_in_torch_out(
    peers: Peers,
) -> None:
    tag, tag2 = fresh_tag(), fresh_tag()

    def one(_: int, comm: Comm) -> tuple[np.ndarray, torch.Tensor]:
        out = comm.empty(WORLD * 5, np.int32)  # any shape with size * numel elements
        src = out[comm.rank * 5 : (comm.rank + 1) * 5]  # the input already in its block
        src[:] = np.arange(5) + 10 * comm.rank
        got = comm.all_gather(src, out=out, tag=tag, timeout_s=CALL_TIMEOUT_S)
        assert got is out
        t = torch.full((2, 2), float(comm.rank), dtype=torch.bfloat16)
        gathered = comm.all_gather(t, tag=tag2, timeout_s=CALL_TIMEOUT_S)
        return np.array(out, copy=True), gathered

    for out, gathered in run_on_all(peers.comms, one):
        np.testing.assert_array_equal(
            out, np.concatenate([np.arange(5) + 10 * r for r in range(3)])
        )
        assert isinstance(gathered, torch.Tensor) and gathered.dtype == torch.bfloat16
        assert gathered.shape == (WORLD, 2, 2)
        for r in range(WORLD):
            assert bool((gathered[r] == r).all())


@FEW
@given(
    counts=st.lists(st.sampled_from([0, 1, 3, 1000, 70_001]), min_size=WORLD, max_size=WORLD),
    dtype=dtypes,
)
def test_all_gather_v_returns_every_ranks_elements_whatever_their_counts(
    peers: Peers, counts: list[int], dtype: np.dtype[Any]
) -> None:
    tag = fresh_tag()
    inputs = [peer_inputs(1, c, dtype, "sum", seed=c + r)[0] for r, c in enumerate(counts)]

    def one(_: int, comm: Comm) -> list[np.ndarray]:
        return comm.all_gather_v(inputs[comm.rank], tag=tag, timeout_s=CALL_TIMEOUT_S)

    for parts in run_on_all(peers.comms, one):
        assert [p.shape for p in parts] == [(c,) for c in counts]
        for part, src in zip(parts, inputs, strict=True):
            assert part.dtype == dtype and part.tobytes() == src.tobytes()


def test_quantized_all_gather_v_is_bit_identical_and_torch_gives_torch(peers: Peers) -> None:
    tag, tag2 = fresh_tag(), fresh_tag()
    counts = [5000, 0, 1234]

    def one(_: int, comm: Comm) -> tuple[list[np.ndarray], list[torch.Tensor]]:
        src = np.linspace(-1, 1, counts[comm.rank], dtype=np.float32) * (comm.rank + 1)
        parts = comm.all_gather_v(src, codec="uint8", tag=tag, timeout_s=CALL_TIMEOUT_S)
        t = torch.arange(comm.rank + 1, dtype=torch.int64)
        return parts, comm.all_gather_v(t, tag=tag2, timeout_s=CALL_TIMEOUT_S)

    results = run_on_all(peers.comms, one)
    assert_bit_identical([np.concatenate(parts) for parts, _ in results])
    for _, tparts in results:
        assert [t.tolist() for t in tparts] == [list(range(r + 1)) for r in range(WORLD)]


def _ops_for(dtype: np.dtype[Any]) -> list[str]:
    ops = ["sum", "min", "max", "prod"]
    return [*ops, "avg"] if dtype in FLOAT_DTYPES else ops


@FEW
@given(n=sizes, dtype=dtypes, data=st.data())
def test_reduce_scatter_gives_each_rank_its_block_of_the_reduction(
    peers: Peers, n: int, dtype: np.dtype[Any], data: st.DataObject
) -> None:
    op = data.draw(st.sampled_from(_ops_for(dtype)))
    inputs, tag = peer_inputs(WORLD, n, dtype, op, seed=n + 2), fresh_tag()

    def one(_: int, comm: Comm) -> tuple[int, np.ndarray, np.ndarray]:
        src = inputs[comm.rank].copy()
        out = comm.reduce_scatter(src, op=op, tag=tag, timeout_s=CALL_TIMEOUT_S)
        return comm.rank, out, src

    ref = reference(inputs, op)
    for rank, out, src in run_on_all(peers.comms, one):
        assert src.tobytes() == inputs[rank].tobytes(), "the input must not be modified"
        start, stop = output_range(n, WORLD, rank)
        assert out.shape == (stop - start,) and out.dtype == dtype
        if dtype in INT_DTYPES or op in ("min", "max"):
            np.testing.assert_array_equal(out.astype(np.float64), ref[start:stop])
        else:
            eps = float(np.finfo(np.float16).eps) if dtype.itemsize == 2 else 1e-6
            tol = 8 * eps * WORLD
            np.testing.assert_allclose(out.astype(np.float64), ref[start:stop], rtol=tol, atol=tol)


def test_quantized_reduce_scatter_is_close_to_the_reference(peers: Peers) -> None:
    n, tag = 10_001, fresh_tag()
    inputs = _inputs(n, np.dtype(np.float32), seed=9)

    def one(_: int, comm: Comm) -> tuple[int, np.ndarray]:
        out = comm.empty(
            output_range(n, WORLD, comm.rank)[1] - output_range(n, WORLD, comm.rank)[0]
        )
        comm.reduce_scatter(inputs[comm.rank], out=out, codec="uint8", tag=tag, timeout_s=60)
        return comm.rank, np.array(out, copy=True)

    ref = reference(inputs, "sum")
    for rank, out in run_on_all(peers.comms, one):
        start, stop = output_range(n, WORLD, rank)
        assert float(np.max(np.abs(out - ref[start:stop]))) <= WORLD * WORLD / 255


def test_barrier_returns_only_after_every_rank_entered_it(peers: Peers) -> None:
    entered: list[bool] = [False] * WORLD
    tag = fresh_tag()

    def one(_: int, comm: Comm) -> list[bool]:
        if comm.rank == WORLD - 1:
            time.sleep(0.3)  # the others are inside the barrier by then
        entered[comm.rank] = True
        comm.barrier(tag=tag, timeout_s=CALL_TIMEOUT_S)
        return list(entered)

    for seen in run_on_all(peers.comms, one):
        assert all(seen)


def _timed_outcomes(comms: list[Comm], fn: Callable[[Comm], Any]) -> tuple[list[Any], float]:
    """Every rank's outcome of ``fn`` (started together) and the slowest one's seconds."""
    started = threading.Barrier(len(comms))
    ended = [0.0] * len(comms)

    def one(i: int, comm: Comm) -> Any:
        started.wait(10)
        try:
            return fn(comm)
        finally:
            ended[i] = time.monotonic()

    t0 = time.monotonic()
    outcomes = run_on_all_outcomes(comms, one)
    return outcomes, max(ended) - t0


# (a root per rank, in rank order): who believes what
ROOT_DISAGREEMENTS = {
    "one-dissenter": (2, 1, 1),  # rank 1 sends; rank 2 is rank 0's would-be root
    "everyone-root": (0, 1, 2),  # every rank believes it is the root and just sends
}


@pytest.mark.parametrize("algo", ["star", "chain"])
@pytest.mark.parametrize("roots", list(ROOT_DISAGREEMENTS))
def test_ranks_that_disagree_on_the_root_all_fail_with_mismatch_error_within_bound(
    peers: Peers, algo: str, roots: str
) -> None:
    # A root hears nothing from the others in the data, so it must learn of their
    # agreement before it reports success: no rank completes, none is left waiting.
    tag, sent = fresh_tag(), np.arange(1000, dtype=np.float32)

    def one(comm: Comm) -> np.ndarray:
        root = ROOT_DISAGREEMENTS[roots][comm.rank]
        buf = sent.copy() if root == comm.rank else np.zeros(1000, np.float32)
        return comm.broadcast(buf, root=root, algo=algo, tag=tag, timeout_s=20.0)

    outcomes, slowest_s = _timed_outcomes(peers.comms, one)
    assert all(isinstance(o, MismatchError) for o in outcomes), outcomes
    assert slowest_s < MISMATCH_BOUND_S, slowest_s


def test_a_refused_broadcast_fails_its_root_too(peers: Peers) -> None:
    tag = fresh_tag()

    def one(comm: Comm) -> np.ndarray:
        # The last rank names a root outside the world: refused there, at once.
        root = WORLD if comm.rank == WORLD - 1 else 0
        return comm.broadcast(np.ones(4, np.float32), root=root, tag=tag, timeout_s=20.0)

    outcomes, slowest_s = _timed_outcomes(peers.comms, one)
    by_rank = {c.rank: o for c, o in zip(peers.comms, outcomes, strict=True)}
    assert isinstance(by_rank[WORLD - 1], InvalidArgument), outcomes
    assert all(isinstance(by_rank[r], CollectiveAborted) for r in range(WORLD - 1)), outcomes
    assert slowest_s < MISMATCH_BOUND_S, slowest_s


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter"])
def test_a_rank_with_nothing_to_receive_that_disagrees_fails_like_the_others(
    peers: Peers, kind: str
) -> None:
    # The dissenter's call leaves it nothing to receive (all-gather: no elements
    # anywhere; reduce-scatter of one element: rank 1 only starts that element's
    # chain): it must not complete on its own.
    tag = fresh_tag()

    def one(comm: Comm) -> Any:
        if kind == "all_gather":
            src = np.ones(0 if comm.rank == 0 else 4, np.float32)
            return comm.all_gather(src, tag=tag, timeout_s=20.0)
        n = 1 if comm.rank == 1 else WORLD
        return comm.reduce_scatter(np.ones(n, np.float32), tag=tag, timeout_s=20.0)

    outcomes, slowest_s = _timed_outcomes(peers.comms, one)
    assert all(isinstance(o, MismatchError) for o in outcomes), outcomes
    assert slowest_s < MISMATCH_BOUND_S, slowest_s


def test_mismatched_all_gather_counts_fail_every_rank_with_mismatch_error(peers: Peers) -> None:
    tag = fresh_tag()

    def one(_: int, comm: Comm) -> None:
        comm.all_gather(np.ones(10 + (comm.rank == 1), np.float32), tag=tag, timeout_s=20.0)

    outcomes = run_on_all_outcomes(peers.comms, one)
    assert all(isinstance(o, MismatchError) for o in outcomes), outcomes


def test_a_root_outside_the_world_is_refused_on_every_rank(peers: Peers) -> None:
    tag = fresh_tag()

    def one(_: int, comm: Comm) -> None:
        comm.broadcast(np.ones(4, np.float32), root=WORLD, tag=tag, timeout_s=20.0)

    outcomes = run_on_all_outcomes(peers.comms, one)
    assert all(isinstance(o, InvalidArgument) for o in outcomes), outcomes


def test_a_cancelled_collective_fails_on_the_others_with_collective_aborted(peers: Peers) -> None:
    # The third peer never joins, so neither call can complete on its own.
    tag, tag2 = fresh_tag(), fresh_tag()
    first = peers.comms[0].barrier_async(tag=tag, timeout_s=30)
    other = peers.comms[1].barrier_async(tag=tag, timeout_s=30)
    assert first.cancel() is True
    with pytest.raises(CollectiveAborted):
        other.wait(20)
    gather = peers.comms[0].all_gather_v_async(np.ones(3, np.int32), tag=tag2, timeout_s=30)
    assert gather.cancel() is True  # in its counts phase
    with pytest.raises(CollectiveAborted):
        gather.wait(20)


def test_concurrent_async_collectives_of_every_kind_with_default_tags(peers: Peers) -> None:
    n = 70_001

    def one(_: int, comm: Comm) -> list[Any]:
        r = comm.rank
        handles = [
            comm.broadcast_async(np.full(n, r, np.float32), root=2, timeout_s=60),
            comm.all_gather_async(np.full(7, r, np.int64), timeout_s=60),
            comm.all_gather_v_async(np.full(r * 3, r, np.int32), timeout_s=60),
            comm.reduce_scatter_async(np.arange(n, dtype=np.int64) * (r + 1), timeout_s=60),
            comm.barrier_async(timeout_s=60),
            comm.all_reduce_async(np.full(n, r + 1, np.float32), timeout_s=60),
        ]
        # Waited in reverse order: each runs on its own, whatever the caller waits for.
        return [h.wait(60) for h in reversed(handles)][::-1]

    total = np.arange(n, dtype=np.int64) * sum(r + 1 for r in range(WORLD))
    for rank, res in enumerate(run_on_all(peers.comms, one)):
        rank = peers.comms[rank].rank
        bcast, gathered, parts, block, barrier, reduced = res
        assert (bcast == 2).all()
        np.testing.assert_array_equal(gathered, np.repeat(np.arange(WORLD), 7).reshape(WORLD, 7))
        assert [p.tolist() for p in parts] == [[r] * (r * 3) for r in range(WORLD)]
        start, stop = output_range(n, WORLD, rank)
        np.testing.assert_array_equal(block, total[start:stop])
        assert barrier is None
        assert (reduced == sum(range(1, WORLD + 1))).all()


@pytest.mark.parametrize("kind", ["broadcast", "all_gather", "reduce_scatter", "barrier"])
def test_peer_killed_mid_collective_fails_every_survivor_with_peer_lost_within_bound(
    tmp_path: Path, kind: str
) -> None:
    with running_peers(WORLD, tmp_path) as p:
        victim = p.cluster.daemons[WORLD - 1]
        survivors = p.comms[: WORLD - 1]
        started = threading.Barrier(len(survivors) + 1)
        finished = [0.0] * len(survivors)

        def one(i: int, comm: Comm) -> Any:
            started.wait(10)
            try:
                buf = np.ones(1 << 20, np.float32)
                if kind == "broadcast":  # from the victim, which never sends
                    return comm.broadcast(buf, root=victim_rank, tag="k", timeout_s=30)
                if kind == "all_gather":
                    return comm.all_gather(buf, tag="k", timeout_s=30)
                if kind == "reduce_scatter":
                    return comm.reduce_scatter(buf, tag="k", timeout_s=30)
                return comm.barrier(tag="k", timeout_s=30)
            finally:
                finished[i] = time.monotonic()

        victim_rank = p.comms[WORLD - 1].rank
        killer = threading.Thread(target=lambda: (started.wait(10), time.sleep(0.2)))
        killer.start()
        outcomes_box: list[list[Any]] = []
        runner = threading.Thread(
            target=lambda: outcomes_box.append(run_on_all_outcomes(survivors, one, 40.0))
        )
        runner.start()
        killer.join()
        t0 = time.monotonic()
        p.cluster.kill(victim)
        runner.join(45)
        outcomes = outcomes_box[0]
        for o in outcomes:
            assert isinstance(o, PeerLost), outcomes
            assert o.peer == victim.peer_id, o
        assert max(finished) - t0 < KILL_BOUND_S, [f - t0 for f in finished]
