"""All-reduce over real sockets: results equal numpy and are bit-identical on every peer.

One cluster per world size serves the whole module (a coordinator and W daemon
processes on loopback, driven from one thread per peer); every collective uses
a fresh tag, so tests do not depend on each other's order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from cluster_harness import (
    CALL_TIMEOUT_S,
    DTYPES,
    FLOAT_DTYPES,
    Peers,
    assert_bit_identical,
    assert_matches_reference,
    fresh_tag,
    peer_inputs,
    reference,
    run_on_all,
    running_peers,
)
from collnet_client import Comm

pytestmark = pytest.mark.timeout(90)

WORLDS = [1, 2, 3, 5, 8]
ALGOS = ["ring", "star", "direct", "auto"]
# 0 and 1 element; 1000 is not divisible by 3 nor by the codec block (256);
# 7919 is prime, so divisible by no world size and no block.
ODD_SIZES = [0, 1, 1000, 7919]
CHUNK_BYTES = 1 << 20  # the daemons' default --chunk-bytes
CODECS = ["fp16", "bf16", "uint8", "uint4", "uint8+lz4"]
# Quantization levels of each codec's mantissa or code (see collnet.codec).
_LEVELS = {"fp16": 2**11, "bf16": 2**8, "uint8": 255, "uint4": 15}


def _dtype_id(dt: np.dtype[Any]) -> str:
    return str(dt)


def _ops_for(dtype: np.dtype[Any]) -> list[str]:
    return (
        ["sum", "avg", "min", "max", "prod"]
        if dtype in FLOAT_DTYPES
        else ["sum", "min", "max", "prod"]
    )


DTYPE_OPS = [pytest.param(dt, op, id=f"{dt}-{op}") for dt in DTYPES for op in _ops_for(dt)]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def peers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peers]:
    world = request.param
    with running_peers(world, tmp_path_factory.mktemp(f"allreduce-w{world}")) as p:
        yield p


def quantized_error_bound(codec: str, world: int, op: str) -> float:
    """A loose bound on |result - float64 reference| for inputs in [-1, 1).

    Partial results reach magnitude ``world``; each of about ``world`` hops
    (and the owner's final encoding) adds at most half a quantization step of
    a block whose range is at most ``2 * world``.
    """
    bound = world * world / _LEVELS[codec.split("+")[0]]
    return bound / world if op == "avg" else bound


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize(("dtype", "op"), DTYPE_OPS)
def test_all_reduce_matches_numpy_and_is_bit_identical_on_every_peer(
    peers: Peers, dtype: np.dtype[Any], op: str, algo: str
) -> None:
    for n in ODD_SIZES:
        inputs = peer_inputs(peers.size, n, dtype, op, seed=n)
        results = peers.all_reduce(inputs, op=op, algo=algo)
        assert_matches_reference(results, inputs, op, where=f"n={n}:")
        assert_bit_identical(results, where=f"n={n}:")


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.int64)], ids=_dtype_id)
@pytest.mark.parametrize("algo", ["ring", "star", "direct"])  # auto picks one of these
def test_tensor_larger_than_a_chunk_is_pipelined_in_several_chunks_correctly(
    peers: Peers, algo: str, dtype: np.dtype[Any]
) -> None:
    # Every ring segment spans at least two chunks, and the last chunk is short.
    nbytes = max(peers.size, 2) * (CHUNK_BYTES + CHUNK_BYTES // 2)
    n = nbytes // dtype.itemsize + 3
    inputs = peer_inputs(peers.size, n, dtype, "sum", seed=7)
    results = peers.all_reduce(inputs, op="sum", algo=algo, zero_copy=True)
    assert_matches_reference(results, inputs, "sum")
    assert_bit_identical(results)


@pytest.mark.parametrize("op", ["sum", "avg", "max"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("codec", CODECS)
def test_quantized_all_reduce_is_bit_identical_and_close_to_float64_reference(
    peers: Peers, codec: str, algo: str, op: str
) -> None:
    for n in (1, 7919):
        inputs = peer_inputs(peers.size, n, np.dtype(np.float32), op, seed=n)
        results = peers.all_reduce(inputs, op=op, codec=codec, algo=algo)
        assert_bit_identical(results, where=f"n={n}:")
        err = float(np.max(np.abs(results[0].astype(np.float64) - reference(inputs, op))))
        assert err <= quantized_error_bound(codec, peers.size, op), (n, err)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:], ids=_dtype_id)
@pytest.mark.parametrize("codec", ["uint8", "fp16"])
def test_quantized_all_reduce_of_half_precision_tensors_is_bit_identical(
    peers: Peers, codec: str, dtype: np.dtype[Any]
) -> None:
    inputs = peer_inputs(peers.size, 7919, dtype, "sum", seed=3)
    results = peers.all_reduce(inputs, op="sum", codec=codec, algo="ring")
    assert_bit_identical(results)
    assert results[0].dtype == dtype
    err = float(np.max(np.abs(results[0].astype(np.float64) - reference(inputs, "sum"))))
    # The result is also rounded to the half-precision dtype once.
    assert err <= quantized_error_bound(codec, peers.size, "sum") + peers.size / 2**7


@pytest.mark.parametrize("codec", CODECS)
def test_quantized_tensor_larger_than_a_chunk_is_bit_identical(peers: Peers, codec: str) -> None:
    n = max(peers.size, 2) * (CHUNK_BYTES + CHUNK_BYTES // 2) // 4 + 5
    inputs = peer_inputs(peers.size, n, np.dtype(np.float32), "sum", seed=11)
    results = peers.all_reduce(inputs, op="sum", codec=codec, zero_copy=True)
    assert_bit_identical(results)
    err = float(np.max(np.abs(results[0].astype(np.float64) - reference(inputs, "sum"))))
    assert err <= quantized_error_bound(codec, peers.size, "sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_zero_copy_and_staged_paths_give_identical_results(
    peers: Peers, dtype: np.dtype[Any]
) -> None:
    for algo in ("ring", "star", "direct"):
        inputs = peer_inputs(peers.size, 7919, dtype, "sum", seed=5)
        staged = peers.all_reduce(inputs, op="sum", algo=algo, zero_copy=False)
        shared = peers.all_reduce(inputs, op="sum", algo=algo, zero_copy=True)
        assert_matches_reference(staged, inputs, "sum")
        assert_bit_identical(staged + shared)


def test_plain_array_is_updated_in_place_and_keeps_its_shape(peers: Peers) -> None:
    tag = fresh_tag()

    def one(rank: int, comm: Comm) -> np.ndarray:
        arr = np.full((3, 7, 11), rank + 1, dtype=np.float32)
        out = comm.all_reduce(arr, tag=tag, timeout_s=CALL_TIMEOUT_S)
        assert out is arr
        return arr

    total = sum(range(1, peers.size + 1))
    for arr in run_on_all(peers.comms, one):
        assert arr.shape == (3, 7, 11)
        np.testing.assert_array_equal(arr, np.full((3, 7, 11), total, dtype=np.float32))


def test_slice_of_a_shared_array_is_reduced_in_place_without_touching_its_neighbours(
    peers: Peers,
) -> None:
    tag = fresh_tag()

    def one(rank: int, comm: Comm) -> np.ndarray:
        buf = comm.empty(1000, np.int32)
        buf[:] = -7
        window = buf[13 : 13 + 500]  # an offset into the segment, not aligned to anything
        window[:] = np.arange(500, dtype=np.int32) * (rank + 1)
        out = comm.all_reduce(window, tag=tag, timeout_s=CALL_TIMEOUT_S)
        assert out is window
        return np.array(buf, copy=True)

    total = sum(range(1, peers.size + 1))
    for buf in run_on_all(peers.comms, one):
        np.testing.assert_array_equal(buf[13:513], np.arange(500, dtype=np.int32) * total)
        assert (buf[:13] == -7).all() and (buf[513:] == -7).all()


def test_non_contiguous_shared_array_is_staged_and_reduced_correctly(peers: Peers) -> None:
    tag = fresh_tag()

    def one(rank: int, comm: Comm) -> np.ndarray:
        buf = comm.zeros(2000, np.float32)
        strided = buf[::2]
        strided[:] = rank + 1
        comm.all_reduce(strided, tag=tag, timeout_s=CALL_TIMEOUT_S)
        return np.array(buf, copy=True)

    total = sum(range(1, peers.size + 1))
    for buf in run_on_all(peers.comms, one):
        assert (buf[::2] == total).all() and (buf[1::2] == 0).all()


def test_plain_array_created_after_a_shared_array_was_freed_still_gets_the_result(
    peers: Peers,
) -> None:
    # A freed shared array's id may be reused by the next array; the client
    # must not mistake the new (plain) array for the freed shared one.
    tags = [fresh_tag() for _ in range(20)]

    def one(rank: int, comm: Comm) -> list[np.ndarray]:
        outs = []
        for tag in tags:
            shared = comm.empty(16, np.float32)
            del shared
            plain = np.full(16, rank + 1, dtype=np.float32)
            comm.all_reduce(plain, tag=tag, timeout_s=CALL_TIMEOUT_S)
            outs.append(plain)
        return outs

    total = sum(range(1, peers.size + 1))
    for outs in run_on_all(peers.comms, one):
        for plain in outs:
            np.testing.assert_array_equal(plain, np.full(16, total, dtype=np.float32))


def test_several_collectives_in_flight_per_peer_complete_in_any_order(peers: Peers) -> None:
    """Each peer issues six all-reduces in its own order and waits in yet another order."""
    specs: list[tuple[str, np.dtype[Any], int, str, str, bool]] = [
        # (tag, dtype, n, op, codec, zero_copy)
        (fresh_tag(), np.dtype(np.float32), 7919, "sum", "none", False),
        (fresh_tag(), np.dtype(np.int64), 300_001, "max", "none", True),
        (fresh_tag(), np.dtype(np.float16), 1000, "avg", "none", False),
        (fresh_tag(), np.dtype(np.float32), 70_001, "sum", "uint8", True),
        (fresh_tag(), np.dtype(np.int32), 1, "prod", "none", False),
        (fresh_tag(), np.dtype(np.float32), 400_003, "min", "none", False),
    ]
    inputs = [
        peer_inputs(peers.size, n, dt, op, seed=i) for i, (_, dt, n, op, _, _) in enumerate(specs)
    ]

    def one(rank: int, comm: Comm) -> list[np.ndarray]:
        order = list(range(len(specs)))
        order = order[rank % len(order) :] + order[: rank % len(order)]
        handles = {}
        for i in order:
            tag, dt, n, op, codec, zero_copy = specs[i]
            if zero_copy:
                buf = comm.empty(n, dt)
                np.copyto(buf, inputs[i][rank])
            else:
                buf = inputs[i][rank].copy()
            handles[i] = comm.all_reduce_async(
                buf, op=op, codec=codec, tag=tag, timeout_s=CALL_TIMEOUT_S
            )
        results: dict[int, np.ndarray] = {}
        for i in reversed(order):
            results[i] = np.array(handles[i].wait(), copy=True)
            assert handles[i].done()
        return [results[i] for i in range(len(specs))]

    per_peer = run_on_all(peers.comms, one)
    for i, (_, _, _, op, codec, _) in enumerate(specs):
        results = [r[i] for r in per_peer]
        assert_bit_identical(results)
        if codec == "none":
            assert_matches_reference(results, inputs[i], op)
        else:
            err = float(np.max(np.abs(results[0] - reference(inputs[i], op))))
            assert err <= quantized_error_bound(codec, peers.size, op)


def test_handle_done_turns_true_without_wait(peers: Peers) -> None:
    tag = fresh_tag()

    def one(rank: int, comm: Comm) -> np.ndarray:
        buf = np.full(100, rank, dtype=np.int64)
        handle = comm.all_reduce_async(buf, tag=tag, timeout_s=CALL_TIMEOUT_S)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not handle.done():
            assert time.monotonic() < deadline, "handle never completed"
            time.sleep(0.005)
        return handle.wait(timeout_s=1.0)

    total = sum(range(peers.size))
    for res in run_on_all(peers.comms, one):
        assert (res == total).all()


def test_default_tags_pair_up_collectives_in_call_order(peers: Peers) -> None:
    # Without explicit tags each Comm numbers its collectives; peers that
    # call in the same order are matched. Fresh Comms start the count afresh.
    comms = [peers.connect(i) for i in range(peers.size)]
    try:

        def one(rank: int, comm: Comm) -> list[float]:
            outs = []
            for k in range(3):
                buf = np.full(10, float(rank + k), dtype=np.float32)
                outs.append(float(comm.all_reduce(buf, timeout_s=CALL_TIMEOUT_S)[0]))
            return outs

        per_peer = run_on_all(comms, one)
    finally:
        for comm in comms:
            comm.close()
    w = peers.size
    expected = [float(sum(range(w)) + k * w) for k in range(3)]
    assert per_peer == [expected] * w


@pytest.mark.parametrize("codec", ["none", "uint8"])
def test_messages_striped_over_several_connections_reassemble_exactly(
    tmp_path_factory: pytest.TempPathFactory, codec: str
) -> None:
    # With 16 MiB chunks each ring message is cut into pieces of at least
    # 2 MiB, one per connection, that may land in any order.
    workdir = tmp_path_factory.mktemp(f"striping-{codec.replace('+', '-')}")
    with running_peers(
        3, workdir, connections=4, extra_args=["--chunk-bytes", str(16 << 20)]
    ) as peers:
        n = 3 * (8 << 20) // 4 + 7
        inputs = peer_inputs(peers.size, n, np.dtype(np.float32), "sum", seed=13)
        results = peers.all_reduce(inputs, op="sum", algo="ring", codec=codec, zero_copy=True)
        assert_bit_identical(results)
        if codec == "none":
            assert_matches_reference(results, inputs, "sum")
        else:
            err = float(np.max(np.abs(results[0] - reference(inputs, "sum"))))
            assert err <= quantized_error_bound(codec, peers.size, "sum")
