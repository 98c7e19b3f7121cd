"""Agreement through the collective engine: a rank reports success only once it
knows every member runs the same collective, whatever the schedule lets it hear.

RouterSim drives N routers whose ranks may run different collectives under one
tag (another root, other counts, another kind). The rule under test: either
every member finishes (they all agreed) or every member fails with
``MismatchError``, the would-be root and the ranks with nothing to receive
included, in any delivery order and whichever rank starts first.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routersim import RouterSim, world_of

from collnet.algo import (
    DisseminationBarrier,
    RingAllGather,
    RingReduceScatter,
    Schedule,
    TreeBroadcast,
    make_all_reduce,
)
from collnet.engine import Failed, Finished, Run
from collnet.errors import MismatchError, PeerLost, ProtocolError
from collnet.wire.datalink import AGREE_STEP, DataPiece

# What shapes a collective's messages; each spec gets its own digest.
Spec = tuple[str, int]
SPECS: list[Spec] = [
    ("broadcast-chain", 0),  # the int: the root
    ("broadcast-chain", 1),
    ("broadcast-star", 0),
    ("broadcast-star", 1),
    ("all_gather", 3),  # the int: every rank's count
    ("all_gather", 0),  # nothing to receive anywhere
    ("all_gather_first_only", 3),  # only rank 0 contributes
    ("reduce_scatter", 1),  # fewer elements than ranks: empty blocks
    ("reduce_scatter", 11),
    ("barrier", 0),
    ("all_reduce", 0),  # nothing to send or receive
    ("all_reduce", 1),
    ("all_reduce", 9),
    ("all_reduce_star", 0),
    ("all_reduce_direct", 2),  # fewer elements than ranks: empty segments
    ("all_reduce_direct", 9),
]


def _schedule(spec: Spec, rank: int, world: int) -> Schedule:
    kind, k = spec
    chunk_bytes = 8  # two int32 a chunk: several messages per block
    if kind.startswith("broadcast"):
        buf = np.full(10, rank, np.int32)
        return TreeBroadcast(rank, world, buf, k, None, chunk_bytes, kind.split("-")[1])
    if kind.startswith("all_gather"):
        counts = [k] * world if kind == "all_gather" else [k] + [0] * (world - 1)
        out = np.full(sum(counts), rank, np.int32)
        return RingAllGather(rank, world, out, counts, None, chunk_bytes)
    if kind == "reduce_scatter":
        return RingReduceScatter(rank, world, np.ones(k, np.int32), "sum", None, chunk_bytes)
    if kind == "barrier":
        return DisseminationBarrier(rank, world)
    algo = kind.removeprefix("all_reduce_") if kind != "all_reduce" else "ring"
    return make_all_reduce(algo, rank, world, np.ones(k, np.int32), "sum", None, chunk_bytes)


def _start_all_interleaved(sim: RouterSim, specs: list[Spec], warmups: list[int]) -> None:
    """Start every rank, each after some steps of the network (early data, early ABORTs)."""
    order = list(range(len(specs)))
    sim.rng.shuffle(order)
    for r in order:
        sim.run(warmups[r])
        digest = zlib.crc32(repr(specs[r]).encode())  # one per spec, as the daemon's
        sim.start_schedule(f"p{r}", 1, _schedule(specs[r], r, len(specs)), digest)
    sim.run()


@settings(max_examples=300, deadline=None)
@given(
    world=st.integers(2, 5),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_every_member_finishes_or_every_member_fails_with_mismatch_error(
    world: int, data: st.DataObject, seed: int
) -> None:
    first = data.draw(st.sampled_from(SPECS))
    # Mostly one spec with a dissenter or two: the cases where the majority could
    # otherwise complete among themselves.
    specs = [
        data.draw(st.sampled_from([first, first, *SPECS]), label=f"rank {r}") for r in range(world)
    ]
    warmups = data.draw(st.lists(st.integers(0, 30), min_size=world, max_size=world))
    sim = RouterSim(world_of(world), random.Random(seed))
    _start_all_interleaved(sim, specs, warmups)
    outcomes = [sim.outcome(f"p{r}", (1, 1)) for r in range(world)]
    if len(set(specs)) == 1:
        assert all(isinstance(o, Finished) for o in outcomes), outcomes
    else:
        for o in outcomes:
            assert isinstance(o, Failed) and isinstance(o.error, MismatchError), outcomes
    assert all(not r.runs and r.early_bytes == 0 for r in sim.routers.values())


@pytest.mark.parametrize("tree", ["chain", "star"])
def test_a_broadcast_root_finishes_only_once_every_member_confirmed(tree: str) -> None:
    sim = RouterSim(world_of(3), random.Random(1))
    spec = (f"broadcast-{tree}", 0)
    sim.start_schedule("p0", 1, _schedule(spec, 0, 3))
    sim.start_schedule("p1", 1, _schedule(spec, 1, 3))
    sim.run()
    # The root handed out all its data long ago; p2 has not started.
    assert sim.outcome("p0", (1, 1)) is None
    sim.start_schedule("p2", 1, _schedule(spec, 2, 3))
    sim.run()
    for r in range(3):
        assert isinstance(sim.outcome(f"p{r}", (1, 1)), Finished)


def test_a_member_lost_before_it_confirmed_fails_the_root_with_peer_lost() -> None:
    sim = RouterSim(world_of(3), random.Random(2))
    spec = ("broadcast-star", 0)
    sim.start_schedule("p0", 1, _schedule(spec, 0, 3))
    sim.start_schedule("p1", 1, _schedule(spec, 1, 3))
    sim.run()
    sim.kill("p2")
    for peer in ("p0", "p1"):
        error = sim.error(peer, (1, 1))
        assert isinstance(error, PeerLost) and error.peer == "p2", error
    assert "confirmed" in sim.error("p0", (1, 1)).message


@pytest.mark.parametrize("tree", ["star", "chain"])
def test_every_member_sends_every_other_an_agree_sent_data_or_not(tree: str) -> None:
    # The root sends its children data at start and an AGREE after it all the
    # same: a member that finished on data alone could meet that AGREE later.
    sim = RouterSim(world_of(3), random.Random(4), stripes=1)
    for r in range(3):
        sim.start_schedule(f"p{r}", 1, _schedule((f"broadcast-{tree}", 0), r, 3))
    agrees = [(p.src, p.dst) for p in sim.in_flight if p.meta[2] == AGREE_STEP]
    assert sorted(agrees) == [(f"p{a}", f"p{b}") for a in range(3) for b in range(3) if a != b]
    sim.run()
    assert all(isinstance(sim.outcome(f"p{r}", (1, 1)), Finished) for r in range(3))
    assert all(not r.runs and r.early_bytes == 0 for r in sim.routers.values())


def test_an_agree_never_lands_after_its_run_finished() -> None:
    # Found by the property test above: p2 sends p0 its (empty-block) data
    # later and its AGREE at start; the data, which carried the digest too,
    # landed first and p0 finished, so the AGREE was stashed as early data of
    # a collective that had come and gone, and stayed there.
    sim = RouterSim(world_of(3), random.Random(2))
    _start_all_interleaved(sim, [("reduce_scatter", 1)] * 3, [1, 0, 2])
    assert all(isinstance(sim.outcome(f"p{r}", (1, 1)), Finished) for r in range(3))
    assert all(not r.runs and r.early_bytes == 0 for r in sim.routers.values())


def test_collectives_whose_data_proves_agreement_send_no_agree() -> None:
    sim = RouterSim(world_of(3), random.Random(3))
    for r in range(3):
        sim.start_schedule(f"p{r}", 1, _schedule(("all_reduce", 9), r, 3))
    assert not any(p.meta[2] == AGREE_STEP for p in sim.in_flight)
    sim.run()
    assert all(isinstance(sim.outcome(f"p{r}", (1, 1)), Finished) for r in range(3))


def _agree(digest: int, chunk: int = 0, total: int = 0) -> DataPiece:
    return DataPiece((1, 1), AGREE_STEP, chunk, digest, 0, total)


def test_a_second_or_malformed_agree_is_a_protocol_error() -> None:
    world = world_of(3)
    run = Run((1, 1), world, 0, _schedule(("broadcast-star", 0), 0, 3), 7)
    run.start()
    assert run.unconfirmed() == [1, 2]
    view = run.sink(1, _agree(7), 0)
    run.piece_done("p1")
    assert len(view) == 0 and run.received(1, _agree(7), 0) == []
    assert run.unconfirmed() == [2]
    with pytest.raises(ProtocolError):
        run.sink(1, _agree(7), 0)
    with pytest.raises(ProtocolError):
        run.sink(2, _agree(7, total=4), 4)
    with pytest.raises(MismatchError):
        run.sink(2, _agree(8), 0)
    run.sink(2, _agree(7), 0)
    assert not run.settled  # counted like any piece, until it has landed
    run.piece_done("p2")
    assert run.received(2, _agree(7), 0) == [Finished((1, 1))]
    assert run.settled


@pytest.mark.parametrize(
    ("spec", "needs"),
    [
        (("broadcast-chain", 0), True),
        (("broadcast-star", 1), True),
        (("all_gather", 3), False),
        (("all_gather", 0), True),
        (("all_gather_first_only", 3), True),
        (("reduce_scatter", 2), True),
        (("reduce_scatter", 3), False),
        (("barrier", 0), False),
        (("all_reduce", 0), True),
        (("all_reduce", 1), True),  # fewer elements than ranks: empty segments
        (("all_reduce", 3), False),
        (("all_reduce_star", 0), True),
        (("all_reduce_star", 1), False),
        (("all_reduce_direct", 0), True),
        (("all_reduce_direct", 1), True),
        (("all_reduce_direct", 3), False),
    ],
)
def test_needs_agreement_is_the_same_on_every_rank(spec: Spec, needs: bool) -> None:
    assert {_schedule(spec, r, 3).needs_agreement for r in range(3)} == {needs}


def test_an_all_reduce_where_nobody_sends_at_start_still_sees_the_disagreement() -> None:
    # A star's root sends nothing at start, nor does a ring rank whose segment is
    # empty (fewer elements than ranks): the ring then needs agreement, and its
    # AGREE meets the root's other digest.
    sim = RouterSim(world_of(2), random.Random(5))
    _start_all_interleaved(sim, [("all_reduce_star", 5), ("all_reduce", 1)], [0, 0])
    for r in range(2):
        assert isinstance(sim.error(f"p{r}", (1, 1)), MismatchError)
