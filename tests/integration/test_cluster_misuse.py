"""Misuse gets a typed error on every peer within a bounded time, never a hang.

One three-peer cluster serves the module; after each misuse the world must
still run a correct all-reduce, which ``_world_still_works`` checks.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

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
    run_on_all_outcomes,
    running_peers,
)
from collnet_client import (
    CollectiveAborted,
    Comm,
    DaemonUnavailable,
    InvalidArgument,
    MismatchError,
)

from collnet.wire.localapi import AllReduce

pytestmark = pytest.mark.timeout(60)

WORLD = 3
# A misused collective must fail on every peer well within this.
MISUSE_BOUND_S = 10.0


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    with running_peers(WORLD, tmp_path_factory.mktemp("misuse")) as p:
        yield p


def _world_still_works(peers: Peers) -> None:
    inputs = peer_inputs(peers.size, 4099, np.dtype(np.float32), "sum", seed=1)
    results = peers.all_reduce(inputs, op="sum", algo="ring")
    assert_matches_reference(results, inputs, "sum")
    assert_bit_identical(results)


def _errors_on_every_peer(
    peers: Peers, make_call: Any, expected: type[Exception]
) -> list[BaseException]:
    """Run ``make_call(rank, comm, tag)`` on every peer; each must raise ``expected`` in time."""
    tag = fresh_tag()
    started = time.monotonic()
    outcomes = run_on_all_outcomes(peers.comms, lambda r, c: make_call(r, c, tag))
    elapsed = time.monotonic() - started
    for rank, out in enumerate(outcomes):
        assert isinstance(out, expected), f"rank {rank}: expected {expected.__name__}, got {out!r}"
    assert elapsed < MISUSE_BOUND_S, f"misuse took {elapsed:.1f}s to be reported"
    return outcomes  # type: ignore[return-value]


# (what differs, rank 0's call, everyone else's call); rank 0 is the star's
# root and the ring's receiver from the last rank, so it always hears the others.
_MISMATCHES = {
    "size": (dict(n=1000), dict(n=1001)),
    "dtype": (dict(dtype=np.float32), dict(dtype=np.int32)),
    "op": (dict(op="sum"), dict(op="max")),
    "codec": (dict(codec="none"), dict(codec="uint8")),
    "algo": (dict(algo="ring"), dict(algo="star")),
}


@pytest.mark.parametrize("algo", ["ring", "star"])
@pytest.mark.parametrize("differs", list(_MISMATCHES))
def test_peers_disagreeing_on_a_collective_all_get_mismatch_error_quickly(
    peers: Peers, differs: str, algo: str
) -> None:
    def call(rank: int, comm: Comm, tag: str) -> Any:
        spec: dict[str, Any] = {"n": 1000, "dtype": np.float32, "op": "sum", "codec": "none"}
        spec["algo"] = algo
        spec.update(_MISMATCHES[differs][0 if rank == 0 else 1])
        buf = np.ones(spec.pop("n"), dtype=spec.pop("dtype"))
        return comm.all_reduce(buf, tag=tag, timeout_s=CALL_TIMEOUT_S, **spec)

    errors = _errors_on_every_peer(peers, call, MismatchError)
    ids = {c.peer_id for c in peers.comms}
    for exc in errors:
        # What a user needs to act: which collective, which epoch, which peer.
        assert exc.fields.get("tag") is not None and exc.fields.get("epoch") is not None, exc
        assert exc.fields.get("peer") in ids, exc
    _world_still_works(peers)


def test_a_retry_meeting_another_collective_under_its_new_tag_fails_with_mismatch(
    peers: Peers,
) -> None:
    """A retried collective names the tag it first ran under (``retry_of``). Where a
    member runs another collective under the retry's new tag (the next step of a
    peer on which the failed one had completed, a restarted trainer's first one),
    every member gets MismatchError, never a sum of two steps' inputs."""

    def call(rank: int, comm: Comm, tag: str) -> Any:
        buf = comm.memory.empty(1000, np.float32)
        buf[:] = rank + 1
        where = comm.memory.locate(buf)
        assert where is not None
        request = AllReduce(
            tag=tag,
            shm=where[0].name,
            offset=where[1],
            count=buf.size,
            dtype="float32",
            epoch=comm.epoch,
            timeout_s=CALL_TIMEOUT_S,
            retry_of=None if rank == 0 else "step-7",
        )
        return comm._transport.call(request, CALL_TIMEOUT_S)

    _errors_on_every_peer(peers, call, MismatchError)
    _world_still_works(peers)


@pytest.mark.parametrize(
    ("dtype", "kwargs", "mentions"),
    [
        pytest.param(np.float32, dict(codec="zstd"), "zstd", id="unknown-codec"),
        pytest.param(np.float32, dict(codec="uint8+zstd"), "uint8+zstd", id="unknown-codec-suffix"),
        pytest.param(np.float32, dict(op="median"), "median", id="unknown-op"),
        pytest.param(np.float32, dict(algo="tree"), "tree", id="unknown-algo"),
        pytest.param(np.int32, dict(op="avg"), "avg", id="avg-on-int32"),
        pytest.param(np.int64, dict(op="avg"), "avg", id="avg-on-int64"),
        pytest.param(np.int32, dict(codec="uint8"), "int32", id="quantized-codec-on-int"),
        pytest.param(np.float64, {}, "float64", id="unsupported-dtype"),
    ],
)
def test_invalid_all_reduce_arguments_raise_invalid_argument_on_every_peer(
    peers: Peers, dtype: Any, kwargs: dict[str, Any], mentions: str
) -> None:
    def call(rank: int, comm: Comm, tag: str) -> Any:
        return comm.all_reduce(
            np.ones(100, dtype=dtype), tag=tag, timeout_s=CALL_TIMEOUT_S, **kwargs
        )

    for exc in _errors_on_every_peer(peers, call, InvalidArgument):
        assert mentions in str(exc)
    _world_still_works(peers)


def test_invalid_arguments_on_one_peer_abort_the_others_quickly(peers: Peers) -> None:
    # Rank 0 is refused locally; it tells the others, who fail long before their deadline.
    tag = fresh_tag()

    def call(rank: int, comm: Comm) -> Any:
        codec = "bogus" if rank == 0 else "none"
        return comm.all_reduce(np.ones(10, np.float32), codec=codec, tag=tag, timeout_s=60.0)

    started = time.monotonic()
    outcomes = run_on_all_outcomes(peers.comms, call)
    assert isinstance(outcomes[0], InvalidArgument)
    assert all(isinstance(o, CollectiveAborted) for o in outcomes[1:]), outcomes
    assert all("bogus" in str(o) for o in outcomes[1:]), outcomes
    assert time.monotonic() - started < MISUSE_BOUND_S
    _world_still_works(peers)


def test_all_reduce_on_a_peer_not_yet_admitted_raises_invalid_argument(peers: Peers) -> None:
    cluster = peers.cluster
    joiner = cluster.add_daemon()
    try:
        with collnet_client.connect(joiner.ipc, timeout_s=CALL_TIMEOUT_S) as comm:
            assert joiner.peer_id in comm.world.pending
            started = time.monotonic()
            with pytest.raises(InvalidArgument, match="update_topology"):
                comm.all_reduce(np.ones(10, np.float32), tag=fresh_tag(), timeout_s=CALL_TIMEOUT_S)
            assert time.monotonic() - started < MISUSE_BOUND_S
    finally:
        cluster.kill(joiner, signal.SIGTERM)
        joiner.proc.wait(10)
    assert joiner.peer_id not in peers.comms[0].world.pending
    _world_still_works(peers)


def test_connect_to_an_ipc_path_without_daemon_raises_daemon_unavailable_at_once(
    tmp_path: Any,
) -> None:
    started = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        collnet_client.connect(f"ipc://{tmp_path}/no-daemon.sock")
    assert time.monotonic() - started < 3.0


def test_connect_to_a_tcp_port_without_daemon_raises_daemon_unavailable_within_timeout() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        collnet_client.connect(f"tcp://127.0.0.1:{port}", timeout_s=2.0)
    assert time.monotonic() - started < 5.0


def test_connect_without_an_address_raises_daemon_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLLNET_DAEMON", raising=False)
    with pytest.raises(DaemonUnavailable):
        collnet_client.connect()


def test_failed_collective_returns_promptly_without_cutting_healthy_links(peers: Peers) -> None:
    # Peers disagree on the size, after data started flowing: the failure must come
    # back fast (no waiting on pieces that will never settle) and leave links intact.
    log = peers.cluster.dir / "daemon0.log"
    tag = fresh_tag()

    def call(rank: int, comm: Comm) -> Any:
        n = (4 << 20) + (rank == 1)
        return comm.all_reduce(np.ones(n, np.float32), tag=tag, algo="ring", timeout_s=30.0)

    started = time.monotonic()
    outcomes = run_on_all_outcomes(peers.comms, call)
    assert all(isinstance(o, MismatchError) for o in outcomes), outcomes
    assert time.monotonic() - started < 3.0
    assert "still writing into a failed collective" not in log.read_text()
    _world_still_works(peers)
