"""Broadcast, all-gather(-v), reduce-scatter and barrier with several trainers per node.

Two daemons, two trainers on each (``local_size=2``, each naming its
``local_rank``): four ranks, trainer ``l`` of the node at position ``d`` being
rank ``2d + l``. Every result is checked against numpy on the four trainers'
inputs, bit for bit across trainers; sizes not divisible by four are the
interesting ones (a node then owns blocks of different lengths).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
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
)
from collnet_client import Comm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cluster_local_trainers import sent_to

from collnet.algo.reducescatter import output_range
from collnet.errors import InvalidArgument, MismatchError

pytestmark = pytest.mark.timeout(120)

NODES, LOCAL = 2, 2
RANKS = NODES * LOCAL
MISMATCH_BOUND_S = 5.0  # as test_cluster_collectives: far below the 20 s deadline
FEW = settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
sizes = st.sampled_from([0, 1, 3, 5, 1001, 70_003])
dtypes = st.sampled_from([np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32)])


@pytest.fixture(scope="module")
def trainers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peers, list[Comm]]]:
    """The four trainers, in rank order, with the world agreed."""
    workdir = tmp_path_factory.mktemp("local-collectives")
    with running_peers(NODES, workdir, admit=False, extra_args=["--metrics-port", "0"]) as peers:
        comms = [
            collnet_client.connect(
                d.ipc, timeout_s=CALL_TIMEOUT_S, local_size=LOCAL, local_rank=local
            )
            for d in peers.cluster.daemons
            for local in range(LOCAL)
        ]
        try:
            run_on_all(comms, lambda _r, c: c.update_topology(timeout_s=CALL_TIMEOUT_S))
            yield peers, sorted(comms, key=lambda c: c.rank)
        finally:
            for c in comms:
                c.close()


def _by_node(peers: Peers, comms: list[Comm]) -> tuple[list[Comm], list[Comm]]:
    """The trainers of daemon 0, and those of daemon 1."""
    first = peers.cluster.daemons[0].peer_id
    return [c for c in comms if c.peer_id == first], [c for c in comms if c.peer_id != first]


def _inputs(n: int, dtype: np.dtype[Any], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Small integers: every sum is exact in every dtype, so numpy's order is ours.
    return [rng.integers(-20, 20, n).astype(dtype) for _ in range(RANKS)]


def test_ranks_are_node_position_times_local_size_plus_local_rank(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    assert [c.rank for c in comms] == list(range(RANKS))
    assert {c.size for c in comms} == {RANKS}
    for c in comms:
        assert c.local_rank is not None
        assert c.rank == c.node_rank * LOCAL + c.local_rank
        assert c.world.peers[c.node_rank] == c.peer_id


@pytest.mark.parametrize("root", range(RANKS))
@FEW
@given(n=sizes, dtype=dtypes, algo=st.sampled_from(["chain", "star"]))
def test_broadcast_gives_every_trainer_the_root_trainers_tensor(
    trainers: tuple[Peers, list[Comm]], n: int, dtype: np.dtype[Any], root: int, algo: str
) -> None:
    _, comms = trainers
    inputs = _inputs(n, dtype, seed=n + root)
    tag = fresh_tag()
    results = run_on_all(
        comms, lambda r, c: c.broadcast(inputs[r].copy(), root=root, algo=algo, tag=tag).copy()
    )
    for res in results:
        assert np.array_equal(res, inputs[root])


def test_a_quantized_broadcast_leaves_every_trainer_the_same_decoded_values(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(50_001).astype(np.float32) for _ in range(RANKS)]
    tag = fresh_tag()
    results = run_on_all(
        comms, lambda r, c: c.broadcast(inputs[r].copy(), root=1, codec="uint8", tag=tag).copy()
    )
    assert_bit_identical(results)
    assert np.abs(results[0] - inputs[1]).max() < 0.05


@FEW
@given(n=sizes, dtype=dtypes)
def test_all_gather_gives_every_trainer_all_inputs_in_rank_order(
    trainers: tuple[Peers, list[Comm]], n: int, dtype: np.dtype[Any]
) -> None:
    _, comms = trainers
    inputs = _inputs(n, dtype, seed=n + 1)
    tag = fresh_tag()
    results = run_on_all(comms, lambda r, c: np.array(c.all_gather(inputs[r], tag=tag)))
    for res in results:
        assert res.shape == (RANKS, n)
        assert np.array_equal(res, np.stack(inputs))


def test_all_gather_in_place_takes_each_trainers_block_of_its_own_output(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    n = 1001
    outs = [c.empty(RANKS * n, np.float32) for c in comms]
    for r, out in enumerate(outs):
        out.fill(-1)
        out[r * n : (r + 1) * n] = r + 1
    tag = fresh_tag()
    run_on_all(comms, lambda r, c: c.all_gather(outs[r][r * n : (r + 1) * n], out=outs[r], tag=tag))
    expected = np.repeat(np.arange(1, RANKS + 1, dtype=np.float32), n)
    for out in outs:
        assert np.array_equal(out, expected)


@FEW
@given(counts=st.lists(st.sampled_from([0, 1, 7, 4099]), min_size=RANKS, max_size=RANKS))
def test_all_gather_v_gives_every_trainer_each_ranks_own_count(
    trainers: tuple[Peers, list[Comm]], counts: list[int]
) -> None:
    _, comms = trainers
    inputs = [np.arange(c, dtype=np.int32) + 1000 * r for r, c in enumerate(counts)]
    tag = fresh_tag()
    results = run_on_all(comms, lambda r, c: c.all_gather_v(inputs[r], tag=tag))
    for res in results:
        assert [len(a) for a in res] == counts
        for got, want in zip(res, inputs, strict=True):
            assert np.array_equal(got, want)


# 6 and 10 give the nodes blocks of unequal length ([4, 2], [6, 4]) where an
# equal split between the nodes would not.
@pytest.mark.parametrize("n", [1, 3, 6, 10, 1001, 70_003])
@FEW
@given(dtype=dtypes, op=st.sampled_from(["sum", "max"]))
def test_reduce_scatter_gives_each_trainer_its_block_of_the_reduction(
    trainers: tuple[Peers, list[Comm]], n: int, dtype: np.dtype[Any], op: str
) -> None:
    _, comms = trainers
    inputs = _inputs(n, dtype, seed=n + 2)
    reduced = np.sum(inputs, axis=0) if op == "sum" else np.max(inputs, axis=0)
    tag = fresh_tag()
    results = run_on_all(comms, lambda r, c: c.reduce_scatter(inputs[r], op=op, tag=tag).copy())
    for r, res in enumerate(results):
        start, stop = output_range(n, RANKS, r)
        assert res.dtype == dtype
        assert np.array_equal(res, reduced[start:stop]), (r, start, stop)
    for r, x in enumerate(_inputs(n, dtype, seed=n + 2)):
        assert np.array_equal(inputs[r], x)  # inputs untouched


def test_reduce_scatter_avg_is_the_mean_over_every_trainer(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    n = 4099
    inputs = [np.full(n, float(2 * r), np.float32) for r in range(RANKS)]  # mean: 3.0
    tag = fresh_tag()
    results = run_on_all(comms, lambda r, c: c.reduce_scatter(inputs[r], op="avg", tag=tag).copy())
    assert sum(len(res) for res in results) == n
    for res in results:
        assert (res == 3.0).all()


def test_an_avg_over_ints_is_refused_typed_on_every_trainer_at_once(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    tag = fresh_tag()
    started = time.monotonic()
    outcomes = run_on_all_outcomes(
        comms,
        lambda _r, c: c.reduce_scatter(np.ones(8, np.int64), op="avg", tag=tag, timeout_s=20.0),
    )
    assert time.monotonic() - started < MISMATCH_BOUND_S
    assert all(isinstance(o, collnet_client.CollnetError) for o in outcomes), outcomes
    assert any(isinstance(o, InvalidArgument) and "avg" in o.message for o in outcomes), outcomes


def test_barrier_lets_no_trainer_out_before_every_trainer_entered(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    tag = fresh_tag()
    late_s = 1.0

    def one(r: int, c: Comm) -> float:
        if r == RANKS - 1:
            time.sleep(late_s)
        c.barrier(tag=tag)
        return time.monotonic()

    started = time.monotonic()
    ends = run_on_all(comms, one)
    assert min(ends) - started >= late_s * 0.9, ends


def test_an_all_gather_crosses_the_network_once_per_node(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    peers, comms = trainers
    d0, d1 = peers.cluster.daemons
    n = 1 << 20  # float32: 4 MiB a trainer, 8 MiB a node
    before = sent_to(d0.metrics, d1.peer_id)
    inputs = [np.full(n, r, np.float32) for r in range(RANKS)]
    tag = fresh_tag()
    run_on_all(comms, lambda r, c: c.all_gather(inputs[r], tag=tag))
    sent = sent_to(d0.metrics, d1.peer_id) - before
    node_bytes = LOCAL * n * 4
    assert 0.9 * node_bytes <= sent <= 1.3 * node_bytes, f"sent {sent} for {node_bytes} a node"


def test_trainers_of_a_node_that_disagree_fail_on_every_trainer_of_every_node(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    counts = [64, 65, 64, 64]  # node 0's trainers disagree
    tag = fresh_tag()
    started = time.monotonic()
    outcomes = run_on_all_outcomes(
        comms, lambda r, c: c.all_gather(np.ones(counts[r], np.float32), tag=tag, timeout_s=20.0)
    )
    assert time.monotonic() - started < MISMATCH_BOUND_S
    assert isinstance(outcomes[0], MismatchError) and isinstance(outcomes[1], MismatchError)
    assert "disagree" in outcomes[0].message
    # Node 1 hears of it from node 0 as a refusal, a typed error too.
    assert all(isinstance(o, collnet_client.CollnetError) for o in outcomes[2:]), outcomes
    # The node groups are unharmed.
    tag = fresh_tag()
    results = run_on_all(comms, lambda r, c: c.reduce_scatter(np.ones(8, np.int64), tag=tag))
    assert all((res == RANKS).all() for res in results)


def test_two_trainers_naming_one_local_rank_fail_typed(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    peers, comms = trainers
    # A second trainer on node 0 that also calls itself local rank 0.
    twin = collnet_client.connect(
        peers.cluster.daemons[0].ipc, timeout_s=CALL_TIMEOUT_S, local_size=LOCAL, local_rank=0
    )
    first, second = _by_node(peers, comms)
    group = [first[0], twin, *second]
    tag = fresh_tag()
    try:
        outcomes = run_on_all_outcomes(group, lambda _r, c: c.barrier(tag=tag, timeout_s=20.0))
    finally:
        twin.close()
    assert isinstance(outcomes[0], MismatchError) and isinstance(outcomes[1], MismatchError)
    assert "local rank" in outcomes[0].message
    assert all(isinstance(o, collnet_client.CollnetError) for o in outcomes[2:]), outcomes
    # The twin took part in node 0's local group, so its exit ends that node's
    # session: the node leaves the world, and its trainers bring it back.
    gone = peers.cluster.daemons[0].peer_id
    deadline = time.monotonic() + 10.0
    while gone in second[0].world.peers:
        assert time.monotonic() < deadline, "node 0 did not leave after its trainer exited"
        time.sleep(0.05)

    def rejoin(_: int, comm: Comm) -> None:
        # Node 1 waits for node 0 to be pending again, or it would agree without it.
        while comm.peer_id != gone and gone not in comm.world.pending:
            assert time.monotonic() < deadline + CALL_TIMEOUT_S
            time.sleep(0.05)
        comm.update_topology(timeout_s=CALL_TIMEOUT_S)

    run_on_all(comms, rejoin)
    comms.sort(key=lambda c: c.rank)
    assert [c.rank for c in comms] == list(range(RANKS))


def test_a_node_with_another_local_size_fails_every_rank_with_mismatch(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    peers, comms = trainers
    # Node 1 is represented by one trainer that says it is alone on its node.
    alone = collnet_client.connect(peers.cluster.daemons[1].ipc, timeout_s=CALL_TIMEOUT_S)
    group = [*_by_node(peers, comms)[0], alone]
    tag = fresh_tag()
    started = time.monotonic()
    try:
        outcomes = run_on_all_outcomes(
            group, lambda _r, c: c.all_gather(np.ones(16, np.float32), tag=tag, timeout_s=20.0)
        )
    finally:
        alone.close()
    assert time.monotonic() - started < MISMATCH_BOUND_S
    assert all(isinstance(o, MismatchError) for o in outcomes), outcomes


def test_a_trainer_of_a_local_group_without_its_local_rank_is_refused_before_sending(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    peers, _ = trainers
    with collnet_client.connect(
        peers.cluster.daemons[0].ipc, timeout_s=CALL_TIMEOUT_S, local_size=LOCAL
    ) as anonymous:
        with pytest.raises(InvalidArgument, match="local_rank"):
            anonymous.barrier(timeout_s=5.0)
        for call in (
            lambda: anonymous.all_gather(np.ones(4, np.float32), timeout_s=5.0),
            lambda: anonymous.broadcast(np.ones(4, np.float32), root=0, timeout_s=5.0),
            lambda: anonymous.reduce_scatter(np.ones(4, np.float32), timeout_s=5.0),
            lambda: anonymous.all_gather_v(np.ones(4, np.float32), timeout_s=5.0),
        ):
            with pytest.raises(InvalidArgument, match="local_rank"):
                call()
        with pytest.raises(InvalidArgument, match="local_rank"):
            _ = anonymous.rank
        assert anonymous.node_rank in (0, 1)


def test_the_torch_backend_runs_over_a_nodes_trainers_with_trainer_ranks(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from collnet_client.torch.process_group import ProcessGroupCollnet
    from collnet_client.torch.rendezvous import agree

    _, comms = trainers
    agreed = run_on_all(comms, lambda _r, c: agree(c, timeout_s=CALL_TIMEOUT_S))
    assert agreed == [(r, RANKS) for r in range(RANKS)]
    n = 12

    def one(rank: int, comm: Comm) -> dict[str, Any]:
        group = ProcessGroupCollnet(comm, rank, RANKS, timedelta(seconds=CALL_TIMEOUT_S))
        try:
            mean = torch.full((n,), float(rank))
            dist.all_reduce(mean, op=dist.ReduceOp.AVG, group=group)
            root = torch.full((n,), float(rank))
            dist.broadcast(root, group=group, group_src=3)
            gathered = torch.empty(RANKS * n)
            dist.all_gather_into_tensor(gathered, torch.arange(n) + 100.0 * rank, group=group)
            block = torch.empty(n // RANKS)
            dist.reduce_scatter_tensor(block, torch.arange(float(n)) * (rank + 1), group=group)
            dist.barrier(group=group)
            return {"mean": mean, "root": root, "gathered": gathered, "block": block}
        finally:
            group.shutdown()

    results = run_on_all(comms, one)
    total = np.arange(float(n)) * sum(range(1, RANKS + 1))
    for rank, res in enumerate(results):
        assert (res["mean"].numpy() == 1.5).all()
        assert (res["root"].numpy() == 3.0).all()
        assert np.array_equal(
            res["gathered"].numpy(),
            np.concatenate([np.arange(n) + 100.0 * r for r in range(RANKS)]),
        )
        start, stop = output_range(n, RANKS, rank)
        assert np.array_equal(res["block"].numpy(), total[start:stop])
