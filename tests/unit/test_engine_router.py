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
from collnet.engine.early import (
    KEY_OVERHEAD_BYTES,
    MAX_EARLY_KEYS,
    MAX_STRANGER_BYTES,
    PIECE_OVERHEAD_BYTES,
)
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
    router = Router("p0", max_early_bytes=3000)
    router.data_sink("p1", DataPiece((1, 1), 0, 0, 7, 0, 600), 600)
    with pytest.raises(ProtocolError, match="limit 3000"):
        router.data_sink("p2", DataPiece((1, 2), 0, 0, 7, 0, 1800), 1800)


def test_early_data_of_a_lost_peer_is_released() -> None:
    router = Router("p0")
    view, _ = router.data_sink("p1", DataPiece((1, 1), 0, 0, 7, 0, 600), 600)
    router.on_data("p1", DataPiece((1, 1), 0, 0, 7, 0, 600), view)
    assert router.early_bytes == 600 + PIECE_OVERHEAD_BYTES + KEY_OVERHEAD_BYTES
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


# -- what early data and early ABORTs may cost -------------------------------------


def _early_piece(router: Router, peer: str, key: tuple[int, int | str], nbytes: int = 1) -> None:
    piece = DataPiece(key, 0, 0, 7, 0, nbytes)
    view, _ = router.data_sink(peer, piece, nbytes)
    router.on_data(peer, piece, view)


def test_tiny_early_pieces_are_charged_what_they_hold_not_their_payload() -> None:
    router = Router("p0", max_early_bytes=1 << 30, max_early_bytes_per_peer=100_000)
    router.world_is(world_of(3))
    kept = 0
    with pytest.raises(ProtocolError, match="per peer"):
        for _ in range(100_000):
            _early_piece(router, "p1", (1, "t"))
            kept += 1
    # Payload alone would have allowed 100 000 one-byte pieces.
    assert kept == (100_000 - KEY_OVERHEAD_BYTES - 1) // (PIECE_OVERHEAD_BYTES + 2)
    assert router.early.held("p1") == router.early_bytes <= 100_000


def test_one_peer_over_its_own_limit_leaves_room_for_the_others() -> None:
    router = Router("p0", max_early_bytes=40_000, max_early_bytes_per_peer=20_000)
    router.world_is(world_of(3))
    with pytest.raises(ProtocolError, match="p1 sent"):
        for _ in range(1000):
            _early_piece(router, "p1", (1, "t"), 100)
    router.link_lost("p1", "protocol error")  # what the executor does on ProtocolError
    assert router.early_bytes == 0 and router.early.held("p1") == 0
    for _ in range(10):  # about half of p2's own limit, with the per-piece charge
        _early_piece(router, "p2", (1, "t"), 100)
    assert router.early.held("p2") == router.early_bytes > 10_000


def test_the_number_of_early_keys_is_bounded() -> None:
    router = Router("p0")
    for tag in range(MAX_EARLY_KEYS):
        _early_piece(router, "p1", (1, tag))
    with pytest.raises(ProtocolError, match="collectives not started here"):
        _early_piece(router, "p1", (1, "one more"))
    _early_piece(router, "p1", (1, 5))  # a key already held still takes pieces


def test_a_long_tag_is_charged_for_every_piece_that_holds_it() -> None:
    router = Router("p0")
    tag = "x" * 10_000
    _early_piece(router, "p1", (1, tag))
    _early_piece(router, "p1", (1, tag))
    assert router.early_bytes == 2 * (1 + PIECE_OVERHEAD_BYTES + len(tag)) + (
        KEY_OVERHEAD_BYTES + len(tag)
    )


def test_pieces_still_being_read_from_a_lost_peer_are_released() -> None:
    router = Router("p0")
    router.data_sink("p1", DataPiece((1, 1), 0, 0, 7, 0, 600), 600)  # never lands
    assert router.early_bytes > 600
    router.link_lost("p1", "reset")
    assert router.early_bytes == 0


def test_early_data_of_an_older_epoch_is_read_and_dropped() -> None:
    router = Router("p0")
    _early_piece(router, "p1", (1, "t"), 100)
    router.world_is(world_of(3, epoch=2))
    assert router.early_bytes == 0  # epoch 1 can never start here any more
    piece = DataPiece((1, "u"), 0, 0, 7, 0, 100)
    view, actions = router.data_sink("p1", piece, 100)
    assert actions == [] and len(view) == 100
    assert router.on_data("p1", piece, view) == [] and router.early_bytes == 0


def test_early_data_from_a_non_member_of_the_current_epoch_is_a_protocol_error() -> None:
    router = Router("p0")
    router.world_is(world_of(3, epoch=2))
    with pytest.raises(ProtocolError, match="not in epoch 2"):
        router.data_sink("stranger", DataPiece((2, "t"), 0, 0, 7, 0, 8), 8)
    _early_piece(router, "p1", (2, "t"))  # a member's is kept
    _early_piece(router, "stranger", (3, "t"))  # a later epoch's world is not known yet
    assert router.early.held("p1") > 0 and router.early.held("stranger") > 0


def test_a_piece_whose_epoch_passed_while_it_was_read_is_not_kept() -> None:
    router = Router("p0")
    piece = DataPiece((1, "t"), 0, 0, 7, 0, 64)
    view, _ = router.data_sink("p1", piece, 64)
    router.world_is(world_of(3, epoch=2))
    router.on_data("p1", piece, view)
    assert router.early_bytes == 0 and len(router.early) == 0


def test_early_aborts_that_could_never_be_honoured_are_not_kept() -> None:
    router = Router("p0")
    router.world_is(world_of(3, epoch=2))
    error = CollectiveAborted("old")
    assert router.on_abort("p1", AbortMessage((1, "t"), error)) == []
    assert router.on_abort("stranger", AbortMessage((2, "t"), error)) == []
    assert router.aborted_early((1, "t"), world_of(3, epoch=1)) is None
    assert router.aborted_early((2, "t"), world_of(3, epoch=2)) is None


def test_an_error_from_an_abort_is_remembered_in_a_compact_copy() -> None:
    router = Router("p0")
    huge = MismatchError(
        "m" * 60_000, peer="p1", blob="b" * 60_000, **{f"f{i}": i for i in range(99)}
    )
    router.on_abort("p1", AbortMessage((1, "t"), huge))
    kept = router.aborted_early((1, "t"), world_of(3))
    assert isinstance(kept, MismatchError)
    assert len(kept.message) <= 1000 and "blob" not in kept.fields and len(kept.fields) <= 16
    assert kept.fields["peer"] == "p1"


def test_a_stranger_flooding_early_data_loses_its_link_and_the_members_go_on() -> None:
    sim = RouterSim(world_of(3), random.Random(3), max_early_bytes_per_peer=50_000)
    router = sim.routers["p1"]
    with pytest.raises(ProtocolError):
        for i in range(10_000):
            _early_piece(router, "stranger", (1, "t"), 1 + i % 7)
    router.link_lost("stranger", "protocol error")
    bufs = _inputs(3, 200, 3)
    expected = np.sum(bufs, axis=0, dtype=np.float32)
    _all_reduce(sim, bufs, tag="t")
    sim.run()
    for r in range(3):
        assert isinstance(sim.outcome(f"p{r}", (1, "t")), Finished)
        np.testing.assert_array_equal(bufs[r], expected)
    assert router.early_bytes == 0


def test_a_peer_outside_the_world_may_stash_far_less_than_a_member() -> None:
    router = Router("p0")
    router.world_is(world_of(3))
    _early_piece(router, "p1", (2, "t"), MAX_STRANGER_BYTES)  # a member, ahead of us
    with pytest.raises(ProtocolError, match="outside the world"):
        _early_piece(router, "nobody", (2, "t"), MAX_STRANGER_BYTES)
    _early_piece(router, "nobody", (2, "t"), 1000)  # a joiner's first piece is fine


def test_a_runs_transmits_carry_its_schedules_fan_and_whether_they_are_timed() -> None:
    from collnet.algo.direct import DirectAllReduce
    from collnet.algo.ring import RingAllReduce
    from collnet.engine import Transmit

    world = world_of(4)
    direct = Run((1, 1), world, 0, DirectAllReduce(0, 4, np.ones(4096, np.float32), "sum"), 7)
    sent = [a for a in direct.start() if isinstance(a, Transmit)]
    assert {a.to for a in sent} == {1, 2, 3} and {(a.fan, a.timed) for a in sent} == {(3, False)}
    star = Run((1, 2), world, 0, _star(0, 4, np.ones(4096, np.float32)), 7)
    assert {(a.fan, a.timed) for a in star.start() if isinstance(a, Transmit)} == {(1, False)}
    ring = Run((1, 3), world, 0, RingAllReduce(0, 4, np.ones(4096, np.float32), "sum"), 7)
    assert {(a.fan, a.timed) for a in ring.start() if isinstance(a, Transmit)} == {(1, True)}
