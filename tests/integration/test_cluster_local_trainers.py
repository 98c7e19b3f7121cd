"""Several trainers per node: reduced in their daemon first, across the network once.

Two daemons, two trainers (``Comm``s with ``local_size=2``) on each. Every
trainer calls every collective; each gets the world's result, and the bytes a
daemon sends its neighbour show the tensor crossed once, not once per trainer.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import collnet_client
import numpy as np
import pytest
from cluster_harness import (
    CALL_TIMEOUT_S,
    Peers,
    assert_bit_identical,
    run_on_all,
    run_on_all_outcomes,
    running_peers,
)
from collnet_client import Comm, MismatchError
from prometheus_client.parser import text_string_to_metric_families

from collnet.state import tensor_digest

pytestmark = pytest.mark.timeout(90)

LOCAL = 2


@pytest.fixture(scope="module")
def trainers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peers, list[Comm]]]:
    workdir = tmp_path_factory.mktemp("local")
    with running_peers(2, workdir, admit=False, extra_args=["--metrics-port", "0"]) as peers:
        comms = [
            collnet_client.connect(d.ipc, timeout_s=CALL_TIMEOUT_S, local_size=LOCAL)
            for d in peers.cluster.daemons
            for _ in range(LOCAL)
        ]
        try:
            worlds = run_on_all(comms, lambda _r, c: c.update_topology(timeout_s=CALL_TIMEOUT_S))
            assert {w.size for w in worlds} == {2}, worlds
            yield peers, comms
        finally:
            for c in comms:
                c.close()


def sent_to(addr: str, peer: str) -> float:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "collnet_peer_sent_bytes_total" and s.labels.get("peer") == peer:
                return s.value
    return 0.0


def test_every_trainer_gets_the_sum_over_all_trainers(trainers: tuple[Peers, list[Comm]]) -> None:
    _, comms = trainers
    n = 100_003
    inputs = [np.random.default_rng(i).integers(-99, 99, n).astype(np.int64) for i in range(4)]
    results = run_on_all(
        comms, lambda r, c: c.all_reduce(inputs[r].copy(), op="sum", tag="sum1").copy()
    )
    assert_bit_identical(results)
    assert np.array_equal(results[0], np.sum(inputs, axis=0))


def test_avg_is_the_mean_over_all_trainers_and_bit_identical(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    inputs = [np.full(4099, float(r + 1), np.float32) for r in range(4)]
    results = run_on_all(
        comms, lambda r, c: c.all_reduce(inputs[r].copy(), op="avg", tag="avg1").copy()
    )
    assert_bit_identical(results)
    assert np.allclose(results[0], 2.5)


def test_the_tensor_crosses_the_network_once_per_node(trainers: tuple[Peers, list[Comm]]) -> None:
    peers, comms = trainers
    d0, d1 = peers.cluster.daemons
    nbytes = 8 << 20
    before = sent_to(d0.metrics, d1.peer_id)
    bufs = [c.empty(nbytes // 4, np.float32) for c in comms]
    for r, b in enumerate(bufs):
        b.fill(r)
    run_on_all(comms, lambda r, c: c.all_reduce(bufs[r], tag="big1"))
    sent = sent_to(d0.metrics, d1.peer_id) - before
    # A 2-peer ring moves half the tensor each way in each phase: ~nbytes in all.
    assert 0.5 * nbytes <= sent <= 1.5 * nbytes, f"sent {sent} bytes for a {nbytes}-byte tensor"
    for b in bufs:
        assert (b == 0 + 1 + 2 + 3).all()


def test_local_trainers_that_disagree_fail_on_every_trainer_of_every_node(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    sizes = [64, 65, 64, 64]  # node 0's trainers disagree
    outcomes = run_on_all_outcomes(
        comms,
        lambda r, c: c.all_reduce(np.ones(sizes[r], np.float32), tag="bad1", timeout_s=20.0),
    )
    for out in outcomes:
        assert isinstance(out, MismatchError), out
    # The node groups are unharmed.
    results = run_on_all(comms, lambda r, c: c.all_reduce(np.ones(8, np.float32), tag="ok2"))
    assert all((res == 4).all() for res in results)


def test_state_sync_gives_every_trainer_of_every_node_the_state(
    trainers: tuple[Peers, list[Comm]],
) -> None:
    _, comms = trainers
    rng = np.random.default_rng(5)
    model = {"w": rng.standard_normal((300, 7)).astype(np.float32), "b": np.arange(9.0)}
    states = [
        {k: v.copy() for k, v in model.items()}
        if r < LOCAL
        else {k: np.zeros_like(v) for k, v in model.items()}
        for r in range(4)
    ]
    revisions = [4, 4, 0, 0]
    results = run_on_all(comms, lambda r, c: c.sync_state(states[r], revisions[r]))
    assert all(res.in_parity and res.revision == 4 and res.peers == 2 for res in results)
    for state in states:
        assert {k: tensor_digest(v) for k, v in state.items()} == {
            k: tensor_digest(v) for k, v in model.items()
        }
