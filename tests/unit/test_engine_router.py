"""The collective engine without sockets: RouterSim drives N routers through
striped, reordered delivery, deaths at any step, early data, late aborts,
cancels, deadlines and epoch changes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routersim import RouterSim, world_of

from collnet.codec.registry import get_codec
from collnet.engine import Failed, Finished, Router, Run, SendAbort
from collnet.errors import (
    CollectiveAborted,
    MismatchError,
    NonFiniteError,
    PeerLost,
    ProtocolError,
    Timeout,
)
from collnet.wire.datalink import AbortMessage, DataPiece


def _inputs(n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-50, 50, length).astype(np.float32) for _ in range(n)]


def _all_reduce(sim: RouterSim, bufs: list[np.ndarray], tag: int | str = 1, **kw: object) -> None:
    order = list(range(len(bufs)))
    sim.rng.shuffle(order)
    for r in order:
        sim.start(f"p{r}", tag, bufs[r], **kw)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    length=st.integers(1, 300),
    algo=st.sampled_from(["ring", "star"]),
    seed=st.integers(0, 2**16),
)
def test_all_reduce_through_routers_equals_numpy_in_any_delivery_order(
    n: int, length: int, algo: str, seed: int
) -> None:
    sim = RouterSim(world_of(n), random.Random(seed))
    bufs = _inputs(n, length, seed)
    expected = np.sum(bufs, axis=0, dtype=np.float32)
    _all_reduce(sim, bufs, algo=algo)
    sim.run()
    for r in range(n):
        assert isinstance(sim.outcome(f"p{r}", (1, 1)), Finished)
        np.testing.assert_array_equal(bufs[r], expected)
    assert all(not router.runs and router.early_bytes == 0 for router in sim.routers.values())


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 5), late=st.integers(0, 4), warmup=st.integers(0, 60), seed=st.integers(0, 999)
)
def test_a_peer_that_starts_late_replays_the_data_that_arrived_early(
    n: int, late: int, warmup: int, seed: int
) -> None:
    late %= n
    sim = RouterSim(world_of(n), random.Random(seed))
    bufs = _inputs(n, 200, seed)
    expected = np.sum(bufs, axis=0, dtype=np.float32)
    for r in range(n):
        if r != late:
            sim.start(f"p{r}", "t", bufs[r])
    sim.run(warmup)
    sim.start(f"p{late}", "t", bufs[late])
    sim.run()
    for r in range(n):
        assert isinstance(sim.outcome(f"p{r}", (1, "t")), Finished)
        np.testing.assert_array_equal(bufs[r], expected)
    assert sim.routers[f"p{late}"].early_bytes == 0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 6),
    victim=st.integers(0, 5),
    at=st.integers(0, 400),
    algo=st.sampled_from(["ring", "star"]),
    seed=st.integers(0, 2**16),
)
def test_a_death_at_any_step_fails_every_survivor_with_the_schedules_peer_lost(
    n: int, victim: int, at: int, algo: str, seed: int
) -> None:
    victim %= n
    sim = RouterSim(world_of(n), random.Random(seed))
    bufs = _inputs(n, 300, seed)
    _all_reduce(sim, bufs, algo=algo)
    sim.run(at)
    sim.kill(f"p{victim}")
    sim.run()
    survivors = [f"p{r}" for r in range(n) if r != victim]
    outcomes = [sim.outcome(p, (1, 1)) for p in survivors]
    if all(isinstance(o, Finished) for o in outcomes):
        return  # it died after everyone was done with it
    for peer in survivors:
        outcome = sim.outcome(peer, (1, 1))
        if isinstance(outcome, Finished):
            continue  # finished before the death; the others fail
        assert isinstance(outcome, Failed), f"{peer} hangs"
        error = outcome.error
        assert isinstance(error, PeerLost | CollectiveAborted), error
        if isinstance(error, PeerLost):
            assert error.peer == f"p{victim}"
            assert error.fields["epoch"] == 1 and error.fields["tag"] == 1
            # The schedule's own account reaches the user.
            assert error.fields["algorithm"] == algo
            if algo == "ring":
                assert "step" in error.fields and "phase" in error.fields
    assert all(not sim.routers[p].runs for p in survivors)


def test_a_cut_link_fails_its_ends_and_they_tell_the_other_members() -> None:
    sim = RouterSim(world_of(4), random.Random(3))
    bufs = _inputs(4, 400, 3)
    _all_reduce(sim, bufs)
    sim.run(10)
    sim.cut("p0", "p1")
    sim.run()
    for peer in ("p0", "p1"):
        error = sim.error(peer, (1, 1))
        assert isinstance(error, PeerLost)
    for peer in ("p2", "p3"):
        assert isinstance(sim.error(peer, (1, 1)), PeerLost)  # told by the ABORT, as sent
    told = {(src, dst) for src, dst, _ in sim.aborts_sent}
    assert {("p0", "p2"), ("p0", "p3"), ("p1", "p2"), ("p1", "p3")} <= told


def test_a_coordinator_verdict_fails_collectives_without_abort_messages() -> None:
    sim = RouterSim(world_of(3), random.Random(1))
    bufs = _inputs(3, 100, 1)
    _all_reduce(sim, bufs)
    sim.run(5)
    for peer in ("p0", "p1"):
        sim.perform(peer, sim.routers[peer].members_gone({"p2"}, "removed at epoch 2"))
    assert isinstance(sim.error("p0", (1, 1)), PeerLost)
    assert "removed at epoch 2" in sim.error("p1", (1, 1)).message
    assert sim.aborts_sent == []


def test_an_abort_that_arrives_before_start_fails_the_collective_at_start() -> None:
    sim = RouterSim(world_of(3), random.Random(2))
    abort = AbortMessage((1, 9), MismatchError("p1 declares another shape"))
    sim.perform("p0", sim.routers["p0"].on_abort("p1", abort))
    assert sim.early_news == [("p0", (1, 9))]
    assert sim.routers["p0"].aborted_early((1, 9), sim.world) is abort.error
    sim.start("p0", 9, np.ones(10, np.float32))
    assert isinstance(sim.error("p0", (1, 9)), MismatchError)


def test_an_early_abort_from_a_non_member_is_not_honoured() -> None:
    sim = RouterSim(world_of(2), random.Random(2))
    router = sim.routers["p0"]
    router.on_abort("stranger", AbortMessage((1, 5), CollectiveAborted("no")))
    assert router.aborted_early((1, 5), sim.world) is None
    bufs = _inputs(2, 50, 0)
    _all_reduce(sim, bufs, tag=5)
    sim.run()
    assert isinstance(sim.outcome("p0", (1, 5)), Finished)


def test_an_abort_from_a_member_fails_a_running_collective_as_collective_aborted() -> None:
    sim = RouterSim(world_of(3), random.Random(4))
    bufs = _inputs(3, 100, 4)
    _all_reduce(sim, bufs)
    error = sim.routers["p2"].expire((1, 1), 2.0)
    sim.perform("p2", error)
    sim.run()
    assert isinstance(sim.error("p2", (1, 1)), Timeout)
    for peer in ("p0", "p1"):
        err = sim.error(peer, (1, 1))
        assert isinstance(err, CollectiveAborted) and "aborted by p2" in err.message


def test_an_abort_for_a_running_collective_from_a_non_member_is_a_protocol_error() -> None:
    sim = RouterSim(world_of(2), random.Random(0))
    sim.start("p0", 1, np.ones(8, np.float32))
    with pytest.raises(ProtocolError, match="not in epoch"):
        sim.routers["p0"].on_abort("stranger", AbortMessage((1, 1), CollectiveAborted("x")))


def test_late_data_for_a_failed_collective_is_dropped_and_its_sender_told_once() -> None:
    sim = RouterSim(world_of(2), random.Random(5))
    bufs = _inputs(2, 600, 5)
    sim.start("p0", 1, bufs[0])
    # p1 (frozen, say) missed that p0 failed the collective.
    sim.perform("p0", sim.routers["p0"].fail_all(PeerLost("p1 frozen", peer="p1")))
    sim.aborts_sent.clear()
    sim.start("p1", 1, bufs[1])
    sim.run()
    # Told once, however many pieces p1 sent (p1 in turn answers p0's own late pieces).
    assert [dst for src, dst, _ in sim.aborts_sent if src == "p0"] == ["p1"]
    assert isinstance(sim.error("p1", (1, 1)), PeerLost)  # p0's reason, as sent


def test_a_digest_mismatch_fails_every_member_with_mismatch_error() -> None:
    sim = RouterSim(world_of(3), random.Random(6))
    bufs = _inputs(3, 90, 6)
    sim.start("p0", 1, bufs[0], digest=1)
    sim.start("p1", 1, bufs[1], digest=2)
    sim.start("p2", 1, bufs[2], digest=2)
    sim.run()
    for peer in ("p0", "p1", "p2"):
        assert isinstance(sim.error(peer, (1, 1)), MismatchError)


def test_a_failed_collective_settles_only_once_its_pieces_in_flight_have_landed() -> None:
    sim = RouterSim(world_of(2), random.Random(7))
    router = sim.routers["p0"]
    buf = np.zeros(64, np.float32)
    run = Run((1, 1), sim.world, 0, _star(0, 2, buf), 7)
    router.start(run)
    piece = DataPiece((1, 1), 1, 0, 7, 0, 256)
    view, _ = router.data_sink("p1", piece, 256)
    actions = router.fail_all(PeerLost("gone", peer="p1"))
    assert any(isinstance(a, Failed) for a in actions)
    assert router.settling((1, 1)) and router.still_writing((1, 1)) == ["p1"]
    # A late piece that was never handed a buffer does not count as that piece.
    late, _ = router.data_sink("p1", DataPiece((1, 1), 1, 0, 7, 0, 256), 256)
    assert router.on_data("p1", piece, late) == []
    assert router.settling((1, 1))
    settled = router.on_data("p1", piece, view)
    assert [type(a).__name__ for a in settled] == ["Settled"]
    assert not router.settling((1, 1))


def _star(rank: int, world: int, buf: np.ndarray) -> object:
    from collnet.algo.star import StarAllReduce

    return StarAllReduce(rank, world, buf, "sum", None, 1 << 20, root=1)


def test_early_data_is_bounded() -> None:
    router = Router("p0", max_early_bytes=1000)
    router.data_sink("p1", DataPiece((1, 1), 0, 0, 7, 0, 600), 600)
    with pytest.raises(ProtocolError, match="limit 1000"):
        router.data_sink("p1", DataPiece((1, 2), 0, 0, 7, 0, 600), 600)


def test_early_data_of_a_lost_peer_is_released() -> None:
    router = Router("p0")
    view, _ = router.data_sink("p1", DataPiece((1, 1), 0, 0, 7, 0, 600), 600)
    router.on_data("p1", DataPiece((1, 1), 0, 0, 7, 0, 600), view)
    assert router.early_bytes == 600
    router.link_lost("p1", "reset")
    assert router.early_bytes == 0


def test_cancel_before_start_fails_the_collective_at_start_and_tells_its_world() -> None:
    sim = RouterSim(world_of(3), random.Random(8))
    router = sim.routers["p0"]
    cancelled, actions = router.cancel((1, 4), CollectiveAborted("cancelled"), sim.world)
    assert cancelled
    assert sorted(a.peer for a in actions if isinstance(a, SendAbort)) == ["p1", "p2"]
    assert router.cancel((1, 4), CollectiveAborted("again"), sim.world) == (False, [])
    sim.start("p0", 4, np.ones(4, np.float32))
    assert isinstance(sim.error("p0", (1, 4)), CollectiveAborted)


def test_a_completed_key_may_be_used_again_but_a_failed_one_fails_at_once() -> None:
    sim = RouterSim(world_of(2), random.Random(9))
    for _ in range(2):
        sim.outcomes.clear()
        bufs = _inputs(2, 40, 9)
        _all_reduce(sim, bufs, tag="step")
        sim.run()
        assert isinstance(sim.outcome("p0", (1, "step")), Finished)
    sim.perform("p0", sim.routers["p0"].fail_all(CollectiveAborted("x")))
    sim.outcomes.clear()
    sim.start("p0", "step", np.ones(40, np.float32))
    sim.start("p0", "other", np.ones(40, np.float32))
    assert sim.outcome("p0", (1, "other")) is None  # running
    sim.perform("p0", sim.routers["p0"].fail_all(CollectiveAborted("y")))
    sim.outcomes.clear()
    sim.start("p0", "other", np.ones(40, np.float32))
    assert isinstance(sim.error("p0", (1, "other")), CollectiveAborted)


def test_starting_a_key_that_is_running_is_a_protocol_error() -> None:
    sim = RouterSim(world_of(2), random.Random(0))
    sim.start("p0", 1, np.ones(8, np.float32))
    with pytest.raises(ProtocolError, match="already running"):
        sim.start("p0", 1, np.ones(8, np.float32))


def test_a_codec_that_cannot_encode_this_peers_data_fails_every_member() -> None:
    sim = RouterSim(world_of(3), random.Random(10))
    bufs = _inputs(3, 300, 10)
    bufs[1][7] = np.nan
    _all_reduce(sim, bufs, codec=get_codec("uint8"))
    sim.run()
    assert isinstance(sim.error("p1", (1, 1)), NonFiniteError)
    for peer in ("p0", "p2"):
        assert isinstance(sim.error(peer, (1, 1)), CollectiveAborted)
