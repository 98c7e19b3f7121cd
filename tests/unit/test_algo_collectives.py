"""Broadcast, all-gather, reduce-scatter and barrier driven through RingSim:
results against numpy, bit-identity under codecs, peer loss, the message contract."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from ringsim import FP16_TEST, Message, RingSim
from test_algo_allreduce import (
    REAL_CODECS,
    assert_bit_identical,
    exact_reference,
    quantized_bound,
    small_int_inputs,
)

from collnet.algo import (
    BROADCAST_ALGORITHMS,
    Abort,
    Complete,
    DisseminationBarrier,
    RingAllGather,
    RingReduceScatter,
    Schedule,
    Send,
    TreeBroadcast,
    all_gather_equal,
    make_broadcast,
)
from collnet.algo.ops import DTYPES, OPS
from collnet.codec.base import Codec
from collnet.errors import InvalidArgument, NonFiniteError, PeerLost, ProtocolError

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float32), np.dtype(np.float16), BF16]
# Moving bytes needs no arithmetic: any numeric dtype goes.
COPY_DTYPES = [*DTYPES, np.dtype(np.uint8), np.dtype(np.float64)]
CODECS = [FP16_TEST, *REAL_CODECS]


def run_to_completion(scheds: list[Schedule], seed: int) -> RingSim:
    sim = RingSim(scheds, random.Random(seed))
    sim.start()
    sim.run()
    assert all(isinstance(sim.outcome.get(r), Complete) for r in range(len(scheds))), sim.outcome
    return sim


def random_values(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)
    return rng.standard_normal(n).astype(dtype)


# -- broadcast --------------------------------------------------------------------------


def broadcasts(
    bufs: list[np.ndarray], root: int, tree: str, codec: Codec | None = None, chunk_elems: int = 4
) -> list[Schedule]:
    chunk_bytes = chunk_elems * bufs[0].dtype.itemsize
    world = len(bufs)
    return [TreeBroadcast(r, world, bufs[r], root, codec, chunk_bytes, tree) for r in range(world)]


@given(
    tree=st.sampled_from(["chain", "star"]),
    dtype=st.sampled_from(COPY_DTYPES),
    world=st.integers(1, 7),
    n=st.integers(0, 61),
    chunk_elems=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_broadcast_gives_every_rank_the_roots_bytes(
    tree: str, dtype: np.dtype, world: int, n: int, chunk_elems: int, seed: int, data: Any
) -> None:
    root = data.draw(st.integers(0, world - 1), label="root")
    rng = np.random.default_rng(seed)
    bufs = [random_values(rng, n, dtype) for _ in range(world)]
    expected = bufs[root].tobytes()
    run_to_completion(broadcasts(bufs, root, tree, chunk_elems=chunk_elems), seed)
    for r, b in enumerate(bufs):
        assert b.tobytes() == expected, f"rank {r}"


@given(
    tree=st.sampled_from(["chain", "star"]),
    dtype=st.sampled_from(FLOATS),
    world=st.integers(2, 7),
    n=st.integers(1, 61),
    chunk_elems=st.integers(1, 9),
    codec_index=st.integers(0, len(CODECS) - 1),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
def test_quantized_broadcast_is_bit_identical_on_every_rank_root_included(
    tree: str, dtype: np.dtype, world: int, n: int, chunk_elems: int, codec_index: int, seed: int
) -> None:
    codec = CODECS[codec_index]
    rng = np.random.default_rng(seed)
    root = seed % world
    bufs = [rng.standard_normal(n).astype(dtype) for _ in range(world)]
    original = bufs[root].astype(np.float64)
    run_to_completion(broadcasts(bufs, root, tree, codec, chunk_elems), seed)
    assert_bit_identical(bufs)
    bound = quantized_bound(codec, 1, [original]) + float(ml_dtypes.finfo(dtype).eps) * np.abs(
        original
    )
    assert np.all(np.abs(bufs[0].astype(np.float64) - original) <= bound)


def test_broadcast_root_sends_views_and_chain_receives_land_in_the_tensor() -> None:
    bufs = [np.arange(8, dtype=np.float32) * (r + 1) for r in range(3)]
    scheds = broadcasts(bufs, root=1, tree="chain", chunk_elems=2)
    actions = scheds[1].start()
    sends = [a for a in actions if isinstance(a, Send)]
    assert [(a.to, a.step, a.chunk) for a in sends] == [(2, 0, c) for c in range(4)]
    assert actions[-1] == Complete()
    for a in sends:
        assert np.shares_memory(np.frombuffer(a.payload, dtype=np.uint8), bufs[1])
    # Rank 2 is one hop from the root, rank 0 two: each receives from its predecessor.
    assert scheds[2].start() == [] and scheds[0].start() == []
    view = scheds[2].recv_buffer(1, 0, 0, 8)
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), bufs[2])
    with pytest.raises(ProtocolError, match="expects step 1 from rank 2"):
        scheds[0].recv_buffer(1, 0, 0, 8)
    with pytest.raises(ProtocolError, match="after completion"):
        scheds[1].recv_buffer(0, 0, 0, 8)  # the root is done once it handed out its chunks


def test_quantized_chain_forwards_the_roots_bytes_unchanged() -> None:
    rng = np.random.default_rng(1)
    bufs = [rng.standard_normal(10).astype(np.float32) for _ in range(4)]
    sim = RingSim(broadcasts(bufs, 2, "chain", FP16_TEST, chunk_elems=3), random.Random(1))
    sent: dict[tuple[int, int], bytes] = {}
    perform = sim.perform

    def record(rank: int, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                sent[(a.step, a.chunk)] = bytes(a.payload)
        perform(rank, actions)

    sim.perform = record  # type: ignore[method-assign]
    sim.start()
    sim.run()
    for (step, chunk), payload in sent.items():
        assert payload == sent[(0, chunk)], (step, chunk)


def test_broadcast_root_that_cannot_encode_aborts_with_codec_error() -> None:
    bufs = [np.ones(6, dtype=np.float32) for _ in range(3)]
    bufs[0][3] = np.inf
    (abort,) = broadcasts(bufs, 0, "chain", FP16_TEST)[0].start()
    assert isinstance(abort, Abort) and isinstance(abort.error, NonFiniteError)


def test_make_broadcast_picks_star_for_small_tensors_and_chain_for_large() -> None:
    assert BROADCAST_ALGORITHMS == ("auto", "chain", "star")
    small = np.zeros(16, dtype=np.float32)
    big = np.zeros(1 << 17, dtype=np.float32)
    assert make_broadcast("auto", 0, 4, small).algorithm == "star"
    assert make_broadcast("auto", 0, 4, big).algorithm == "chain"
    assert make_broadcast("auto", 0, 2, big).algorithm == "star"
    assert make_broadcast("chain", 0, 4, small, root=3).root == 3
    with pytest.raises(InvalidArgument, match="unknown broadcast algorithm"):
        make_broadcast("tree", 0, 4, small)
    with pytest.raises(InvalidArgument, match="root"):
        TreeBroadcast(0, 2, small, root=2)
    with pytest.raises(InvalidArgument, match="floating"):
        TreeBroadcast(0, 2, np.zeros(4, dtype=np.int32), codec=FP16_TEST)


# -- all-gather -------------------------------------------------------------------------


def all_gathers(
    blocks: list[np.ndarray], codec: Codec | None = None, chunk_elems: int = 4, equal: bool = False
) -> tuple[list[np.ndarray], list[Schedule]]:
    """One output per rank with only its own block filled (the rest garbage)."""
    world = len(blocks)
    counts = [b.shape[0] for b in blocks]
    offsets = np.cumsum([0, *counts])
    dtype = blocks[0].dtype
    chunk_bytes = chunk_elems * dtype.itemsize
    rng = np.random.default_rng(world)
    outs, scheds = [], []
    for r in range(world):
        out = random_values(rng, int(offsets[-1]), dtype)
        out[offsets[r] : offsets[r + 1]] = blocks[r]
        outs.append(out)
        if equal:
            scheds.append(all_gather_equal(r, world, out, codec, chunk_bytes))
        else:
            scheds.append(RingAllGather(r, world, out, counts, codec, chunk_bytes))
    return outs, scheds


@given(
    dtype=st.sampled_from(COPY_DTYPES),
    world=st.integers(1, 7),
    sizes=st.data(),
    chunk_elems=st.integers(1, 9),
    equal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_all_gather_concatenates_every_ranks_block_in_rank_order(
    dtype: np.dtype, world: int, sizes: Any, chunk_elems: int, equal: bool, seed: int
) -> None:
    if equal:
        counts = [sizes.draw(st.integers(0, 13), label="count")] * world
    else:
        counts = sizes.draw(st.lists(st.integers(0, 13), min_size=world, max_size=world))
    rng = np.random.default_rng(seed)
    blocks = [random_values(rng, c, dtype) for c in counts]
    outs, scheds = all_gathers(blocks, chunk_elems=chunk_elems, equal=equal)
    run_to_completion(scheds, seed)
    expected = np.concatenate(blocks).tobytes()
    for r, out in enumerate(outs):
        assert out.tobytes() == expected, f"rank {r}"


@given(
    dtype=st.sampled_from(FLOATS),
    world=st.integers(2, 7),
    sizes=st.data(),
    chunk_elems=st.integers(1, 9),
    codec_index=st.integers(0, len(CODECS) - 1),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
def test_quantized_all_gather_is_bit_identical_and_within_codec_bound(
    dtype: np.dtype, world: int, sizes: Any, chunk_elems: int, codec_index: int, seed: int
) -> None:
    codec = CODECS[codec_index]
    counts = sizes.draw(st.lists(st.integers(0, 13), min_size=world, max_size=world))
    rng = np.random.default_rng(seed)
    blocks = [rng.standard_normal(c).astype(dtype) for c in counts]
    outs, scheds = all_gathers(blocks, codec, chunk_elems)
    run_to_completion(scheds, seed)
    assert_bit_identical(outs)
    for r, (start, stop) in enumerate(s.own_range for s in scheds if isinstance(s, RingAllGather)):
        original = blocks[r].astype(np.float64)
        got = outs[0][start:stop].astype(np.float64)
        eps = float(ml_dtypes.finfo(dtype).eps) * np.abs(original)
        assert np.all(np.abs(got - original) <= quantized_bound(codec, 1, [original]) + eps)


def test_all_gather_arguments_are_checked() -> None:
    out = np.zeros(7, dtype=np.float32)
    with pytest.raises(InvalidArgument, match="one count per rank"):
        RingAllGather(0, 3, out, [3, 4])
    with pytest.raises(InvalidArgument, match="counts sum to 6"):
        RingAllGather(0, 3, out, [3, 3, 0])
    with pytest.raises(InvalidArgument, match="not a multiple"):
        all_gather_equal(0, 3, out)
    with pytest.raises(InvalidArgument, match=">= 0"):
        RingAllGather(0, 2, out, [8, -1])


def test_all_gather_receives_land_in_the_output() -> None:
    outs, scheds = all_gathers([np.ones(4, dtype=np.int32) * r for r in range(3)], chunk_elems=2)
    for s in scheds:
        s.start()
    # Rank 0 receives rank 2's block at step 0 from its left neighbour, rank 2.
    view = scheds[0].recv_buffer(2, 0, 1, 8)
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), outs[0][8:12])
    with pytest.raises(ProtocolError, match="receives only from rank 2"):
        scheds[0].recv_buffer(1, 0, 0, 8)
    with pytest.raises(ProtocolError, match="step 2"):
        scheds[0].recv_buffer(2, 2, 0, 8)


# -- reduce-scatter ---------------------------------------------------------------------


def reduce_scatters(
    bufs: list[np.ndarray], op: str, codec: Codec | None = None, chunk_elems: int = 4
) -> list[RingReduceScatter]:
    world = len(bufs)
    chunk_bytes = chunk_elems * bufs[0].dtype.itemsize
    return [RingReduceScatter(r, world, bufs[r], op, codec, chunk_bytes) for r in range(world)]


@given(
    dtype=st.sampled_from(DTYPES),
    op=st.sampled_from(OPS),
    world=st.integers(1, 7),
    n=st.integers(0, 61),
    chunk_elems=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=80, deadline=None)
def test_reduce_scatter_leaves_each_rank_its_array_split_part_of_the_reduction(
    dtype: np.dtype, op: str, world: int, n: int, chunk_elems: int, seed: int
) -> None:
    if op == "avg" and dtype.kind == "i":
        op = "sum"
    rng = np.random.default_rng(seed)
    bufs = small_int_inputs(rng, world, n, dtype, op)
    ref = exact_reference(bufs, op)
    scheds = reduce_scatters(bufs, op, chunk_elems=chunk_elems)
    run_to_completion(list(scheds), seed)
    parts = np.array_split(np.arange(n), world)
    for r, s in enumerate(scheds):
        start, stop = s.output_range
        assert list(range(start, stop)) == parts[r].tolist()
        assert bufs[r][start:stop].tobytes() == ref[start:stop].tobytes(), f"rank {r}"


@given(
    counts=st.lists(st.integers(0, 13), min_size=1, max_size=6),
    op=st.sampled_from(["sum", "max", "prod"]),
    chunk_elems=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=80, deadline=None)
def test_reduce_scatter_with_given_blocks_leaves_each_rank_its_block(
    counts: list[int], op: str, chunk_elems: int, seed: int
) -> None:
    world, n, dtype = len(counts), sum(counts), np.dtype(np.int64)
    rng = np.random.default_rng(seed)
    bufs = small_int_inputs(rng, world, n, dtype, op)
    ref = exact_reference(bufs, op)
    scheds = [
        RingReduceScatter(r, world, bufs[r], op, None, chunk_elems * dtype.itemsize, counts)
        for r in range(world)
    ]
    # An empty block's owner completes without word from some ranks.
    assert all(s.needs_agreement == (0 in counts) for s in scheds)
    run_to_completion(list(scheds), seed)
    starts = np.cumsum([0, *counts])
    for r, s in enumerate(scheds):
        assert s.output_range == (starts[r], starts[r + 1])
        start, stop = s.output_range
        assert bufs[r][start:stop].tobytes() == ref[start:stop].tobytes(), f"rank {r}"


@given(
    dtype=st.sampled_from(FLOATS),
    op=st.sampled_from(["sum", "avg", "min", "max"]),
    world=st.integers(2, 7),
    n=st.integers(0, 61),
    chunk_elems=st.integers(1, 9),
    codec_index=st.integers(0, len(CODECS) - 1),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
def test_quantized_reduce_scatter_is_within_codec_bound(
    dtype: np.dtype, op: str, world: int, n: int, chunk_elems: int, codec_index: int, seed: int
) -> None:
    codec = CODECS[codec_index]
    rng = np.random.default_rng(seed)
    bufs = [rng.standard_normal(n).astype(dtype) for _ in range(world)]
    as64 = [x.astype(np.float64) for x in bufs]
    scheds = reduce_scatters(bufs, op, codec, chunk_elems)
    run_to_completion(list(scheds), seed)
    if n == 0:
        return
    ref = {"sum": np.sum, "avg": np.mean, "min": np.min, "max": np.max}[op](np.stack(as64), axis=0)
    bound = quantized_bound(codec, world, as64) + float(ml_dtypes.finfo(dtype).eps) * np.abs(ref)
    for r, s in enumerate(scheds):
        start, stop = s.output_range
        got = bufs[r][start:stop].astype(np.float64)
        assert np.all(np.abs(got - ref[start:stop]) <= bound[start:stop]), f"rank {r}"


def test_reduce_scatter_peer_lost_names_its_step_and_phase() -> None:
    scheds = reduce_scatters([np.ones(9, dtype=np.float32) for _ in range(3)], "sum")
    scheds[1].start()
    (abort,) = scheds[1].on_peer_lost(0)
    assert isinstance(abort, Abort) and isinstance(abort.error, PeerLost)
    assert "ring reduce-scatter step 0 (reduce-scatter)" in abort.error.message
    assert abort.error.fields["collective"] == "reduce-scatter"


# -- barrier ----------------------------------------------------------------------------


@given(world=st.integers(1, 7), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_barrier_completes_only_after_every_rank_entered(world: int, seed: int) -> None:
    scheds: list[Schedule] = [DisseminationBarrier(r, world) for r in range(world)]
    sim = RingSim(scheds, random.Random(seed))
    order = list(range(world))
    random.Random(seed).shuffle(order)
    entered: set[int] = set()
    held: list[Message] = []  # for ranks that have not entered (the engine's early stash)
    for i, rank in enumerate(order):
        entered.add(rank)
        sim.perform(rank, scheds[rank].start())
        sim.in_flight += [m for m in held if m.dst == rank]
        held = [m for m in held if m.dst != rank]
        while True:
            held += [m for m in sim.in_flight if m.dst not in entered]
            sim.in_flight = [m for m in sim.in_flight if m.dst in entered]
            if not sim.step():
                break
        if i < world - 1:
            assert not sim.outcome, f"completed with {world - 1 - i} ranks still outside"
    assert all(isinstance(sim.outcome.get(r), Complete) for r in range(world))
    assert sim.delivered == world * (world - 1).bit_length()


def test_barrier_refuses_payloads_strangers_and_duplicates() -> None:
    b = DisseminationBarrier(0, 5)  # rounds 0..2: from ranks 4, 3 and 1
    with pytest.raises(ProtocolError, match="before start"):
        b.recv_buffer(4, 0, 0, 0)
    (send,) = b.start()
    assert isinstance(send, Send) and (send.to, send.step, send.payload.nbytes) == (1, 0, 0)
    with pytest.raises(ProtocolError, match="no payload"):
        b.recv_buffer(4, 0, 0, 1)
    with pytest.raises(ProtocolError, match="only from rank 3"):
        b.recv_buffer(4, 1, 0, 0)
    with pytest.raises(ProtocolError, match="does not exist"):
        b.recv_buffer(1, 3, 0, 0)
    b.recv_buffer(1, 2, 0, 0)  # an early round is kept
    assert b.on_receive(1, 2, 0) == []
    with pytest.raises(ProtocolError, match="duplicate"):
        b.recv_buffer(1, 2, 0, 0)
    b.recv_buffer(4, 0, 0, 0)
    assert [(a.to, a.step) for a in b.on_receive(4, 0, 0) if isinstance(a, Send)] == [(2, 1)]
    b.recv_buffer(3, 1, 0, 0)
    actions = b.on_receive(3, 1, 0)
    assert [(a.to, a.step) for a in actions if isinstance(a, Send)] == [(4, 2)]
    assert actions[-1] == Complete() and b.finished
    with pytest.raises(ProtocolError, match="after completion"):
        b.recv_buffer(4, 0, 0, 0)


# -- the message contract and peer loss, for every new schedule -------------------------

KINDS = ["chain", "star", "all-gather", "reduce-scatter", "barrier"]


def build_kind(
    kind: str, world: int, n: int, chunk_elems: int, codec: Codec | None, seed: int
) -> tuple[list[Schedule], list[np.ndarray], Callable[[int], bytes]]:
    """Schedules of ``kind``, their buffers, and the correct bytes of rank r's result."""
    rng = np.random.default_rng(seed)
    if kind in ("chain", "star"):
        bufs = [rng.integers(-8, 9, size=n).astype(np.float32) for _ in range(world)]
        root = seed % world
        want = bufs[root].tobytes()
        return broadcasts(bufs, root, kind, codec, chunk_elems), bufs, lambda r: want
    if kind == "all-gather":
        counts = [int(c) for c in rng.integers(0, n + 1, size=world)]
        blocks = [rng.integers(-8, 9, size=c).astype(np.float32) for c in counts]
        outs, scheds = all_gathers(blocks, codec, chunk_elems)
        whole = np.concatenate(blocks).tobytes()
        return scheds, outs, lambda r: whole
    if kind == "reduce-scatter":
        bufs = [rng.integers(-8, 9, size=n).astype(np.float32) for _ in range(world)]
        ref = exact_reference([b.copy() for b in bufs], "sum")
        rs = reduce_scatters(bufs, "sum", codec, chunk_elems)

        def part(r: int) -> bytes:
            start, stop = rs[r].output_range
            return ref[start:stop].tobytes()

        return list(rs), bufs, part
    return [DisseminationBarrier(r, world) for r in range(world)], [], lambda r: b""


def result_of(kind: str, sched: Schedule, buf: np.ndarray | None) -> bytes:
    if buf is None:
        return b""
    if isinstance(sched, RingReduceScatter):
        start, stop = sched.output_range
        return buf[start:stop].tobytes()
    return buf.tobytes()


@given(
    kind=st.sampled_from(KINDS),
    world=st.integers(2, 7),
    n=st.integers(0, 30),
    chunk_elems=st.integers(1, 7),
    quantized=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
@settings(max_examples=80, deadline=None)
def test_peer_lost_at_random_point_aborts_every_unfinished_survivor(
    kind: str,
    world: int,
    n: int,
    chunk_elems: int,
    quantized: bool,
    seed: int,
    data: st.DataObject,
) -> None:
    codec = FP16_TEST if quantized else None
    dry_scheds, _, _ = build_kind(kind, world, n, chunk_elems, codec, seed)
    dry = run_to_completion(dry_scheds, seed)
    scheds, bufs, want = build_kind(kind, world, n, chunk_elems, codec, seed)
    sim = RingSim(scheds, random.Random(seed))
    sim.start()
    sim.run(max_steps=data.draw(st.integers(0, 2 * dry.delivered), label="steps before death"))
    victim = data.draw(st.integers(0, world - 1), label="victim")
    sim.kill(victim)
    survivors = [r for r in range(world) if r != victim]
    unaware = list(survivors)
    random.Random(seed + 1).shuffle(unaware)
    finished_before = {r for r in survivors if r in sim.outcome}
    while unaware:
        sim.run(max_steps=data.draw(st.integers(0, 5), label="steps between notices"))
        r = unaware.pop()
        was_finished = r in sim.outcome
        sim.notify_lost(r, victim)
        if was_finished:
            continue
        outcome = sim.outcome[r]
        assert isinstance(outcome, Abort), outcome
        assert isinstance(outcome.error, PeerLost)
        assert outcome.error.fields["rank"] == victim
        assert "step" in outcome.error.fields and "phase" in outcome.error.fields
        assert f"peer rank {victim} lost" in outcome.error.message
    sim.run()  # late messages to aborted ranks are drained, never acted on
    completed = {r for r in survivors if isinstance(sim.outcome[r], Complete)}
    assert finished_before <= completed
    for r in completed:
        if not quantized:
            buf = bufs[r] if bufs else None
            assert result_of(kind, scheds[r], buf) == want(r), f"rank {r}"
    share = "all" if completed == set(survivors) else "some" if completed else "none"
    event(f"{kind}: survivors completed: {share}")


def started_kind(kind: str, rank: int, quantized: bool) -> Schedule:
    scheds, _, _ = build_kind(kind, 4, 10, 2, FP16_TEST if quantized else None, seed=1)
    for s in scheds:
        s.start()
    return scheds[rank]


@given(
    kind=st.sampled_from(KINDS),
    quantized=st.booleans(),
    rank=st.integers(0, 3),
    calls=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(-1, 4),
            st.integers(-1, 6),
            st.integers(-1, 6),
            st.sampled_from([0, 1, 2, 4, 8, 40]),
        ),
        max_size=30,
    ),
)
@settings(max_examples=80, deadline=None)
def test_any_message_sequence_gets_a_buffer_actions_or_protocol_error(
    kind: str, quantized: bool, rank: int, calls: list[tuple[bool, int, int, int, int]]
) -> None:
    sched = started_kind(kind, rank, quantized)
    for announce, src, step, chunk, nbytes in calls:
        try:
            if announce:
                view = sched.recv_buffer(src, step, chunk, nbytes)
                assert isinstance(view, memoryview) and view.nbytes == nbytes
                assert not view.readonly
            else:
                actions = sched.on_receive(src, step, chunk)
                assert all(isinstance(a, Send | Complete) for a in actions)
        except ProtocolError:
            pass


@pytest.mark.parametrize("kind", KINDS)
def test_world_of_one_completes_at_start(kind: str) -> None:
    (sched,), bufs, want = build_kind(kind, 1, 5, 2, None, seed=3)
    assert sched.start() == [Complete()]
    assert sched.finished and sched.on_peer_lost(0) == []
    assert result_of(kind, sched, bufs[0] if bufs else None) == want(0)
