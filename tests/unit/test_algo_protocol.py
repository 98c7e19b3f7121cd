"""The all-reduce schedules' message contract: what they accept, what they refuse."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ringsim import FP16_TEST, RingSim, build

from collnet.algo import (
    ALGORITHMS,
    Complete,
    DirectAllReduce,
    RingAllReduce,
    Schedule,
    Send,
    StarAllReduce,
    choose_algorithm,
    make_all_reduce,
)
from collnet.errors import InvalidArgument, ProtocolError


def started(
    algo: str, world: int = 3, n: int = 12, quantized: bool = False, rank: int = 0
) -> Schedule:
    inputs = [np.arange(n, dtype=np.float32) for _ in range(world)]
    scheds = build(algo, inputs, "sum", FP16_TEST if quantized else None, chunk_bytes=8)
    for s in scheds:
        s.start()
    return scheds[rank]


# -- the whole message-name space: a buffer of the right size or a ProtocolError --


@given(
    algo=st.sampled_from(["ring", "star", "direct"]),
    quantized=st.booleans(),
    rank=st.integers(0, 3),
    calls=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(-1, 4),
            st.integers(-1, 6),
            st.integers(-1, 4),
            st.integers(-1, 40),
        ),
        max_size=30,
    ),
)
@settings(max_examples=300, deadline=None)
def test_any_message_sequence_gets_a_buffer_actions_or_protocol_error(
    algo: str,
    quantized: bool,
    rank: int,
    calls: list[tuple[bool, int, int, int, int]],
) -> None:
    sched = started(algo, world=4, n=10, quantized=quantized, rank=rank)
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


# -- specific refusals ----------------------------------------------------------------


def test_ring_refuses_messages_from_anyone_but_its_left_neighbour() -> None:
    ring = started("ring", rank=1)
    with pytest.raises(ProtocolError, match="receives only from rank 0"):
        ring.recv_buffer(2, 0, 0, 8)
    assert not ring.finished


def test_ring_refuses_steps_and_chunks_that_do_not_exist() -> None:
    ring = started("ring", world=3, n=12, rank=0)  # segments of 4 floats, 2 chunks each
    with pytest.raises(ProtocolError, match="step 4"):
        ring.recv_buffer(2, 4, 0, 8)
    with pytest.raises(ProtocolError, match="step -1"):
        ring.recv_buffer(2, -1, 0, 8)
    with pytest.raises(ProtocolError, match="chunk 2"):
        ring.recv_buffer(2, 0, 2, 8)


def test_ring_refuses_duplicates_and_unannounced_messages() -> None:
    ring = started("ring", rank=0)
    with pytest.raises(ProtocolError, match="unannounced"):
        ring.on_receive(2, 0, 0)
    ring.recv_buffer(2, 0, 0, 8)
    with pytest.raises(ProtocolError, match="duplicate"):
        ring.recv_buffer(2, 0, 0, 8)
    ring.on_receive(2, 0, 0)
    with pytest.raises(ProtocolError, match="duplicate"):
        ring.on_receive(2, 0, 0)
    with pytest.raises(ProtocolError, match="duplicate"):
        ring.recv_buffer(2, 0, 0, 8)


def test_ring_refuses_wrong_sizes() -> None:
    raw = started("ring", rank=0)
    with pytest.raises(ProtocolError, match="must be 8 bytes"):
        raw.recv_buffer(2, 0, 0, 12)
    quant = started("ring", rank=0, quantized=True)
    with pytest.raises(ProtocolError, match="limit"):
        quant.recv_buffer(2, 0, 0, 1 << 20)


def test_ring_refuses_an_all_gather_chunk_ahead_of_its_own_contribution() -> None:
    # Step W carries a final value that needs this rank's step 1 send, which
    # only follows the receipt of (step 0, chunk 0).
    ring = started("ring", world=3, rank=0)
    with pytest.raises(ProtocolError, match="before this rank sent its contribution"):
        ring.recv_buffer(2, 3, 0, 8)


def test_undecodable_quantized_chunk_is_a_protocol_error_and_leaves_schedule_open() -> None:
    ring = started("ring", rank=0, quantized=True)
    ring.recv_buffer(2, 0, 0, 3)  # within the size limit, but not 2 bytes a value
    with pytest.raises(ProtocolError, match="undecodable"):
        ring.on_receive(2, 0, 0)
    assert not ring.finished
    assert len(ring.on_peer_lost(2)) == 1


def test_messages_after_complete_are_protocol_errors() -> None:
    inputs = [np.ones(4, dtype=np.float32) for _ in range(2)]
    scheds = build("ring", inputs, "sum")
    sim = RingSim(scheds, random.Random(0))
    sim.start()
    sim.run()
    assert scheds[0].finished
    with pytest.raises(ProtocolError, match="after completion"):
        scheds[0].recv_buffer(1, 0, 0, 8)


def test_messages_before_start_are_protocol_errors() -> None:
    ring = RingAllReduce(0, 3, np.ones(6, dtype=np.float32), "sum")
    with pytest.raises(ProtocolError, match="before start"):
        ring.recv_buffer(2, 0, 0, 8)
    star = StarAllReduce(0, 3, np.ones(6, dtype=np.float32), "sum")
    with pytest.raises(ProtocolError, match="before start"):
        star.recv_buffer(1, 0, 0, 24)
    ring.start()
    with pytest.raises(ProtocolError, match="twice"):
        ring.start()


def test_messages_after_abort_are_drained_and_ignored() -> None:
    ring = started("ring", rank=0)
    ring.recv_buffer(2, 0, 0, 8)
    ring.on_peer_lost(1)
    view = ring.recv_buffer(2, 0, 1, 8)
    view[:] = b"\xff" * 8
    assert ring.on_receive(2, 0, 1) == []
    assert ring.on_receive(2, 0, 0) == []
    with pytest.raises(ProtocolError):
        ring.recv_buffer(2, 0, 1, 1 << 30)


def test_star_root_takes_contributions_and_others_take_results_only() -> None:
    root = started("star", rank=0)
    with pytest.raises(ProtocolError, match="expects step 0"):
        root.recv_buffer(1, 1, 0, 8)
    with pytest.raises(ProtocolError, match="expects step 0"):
        root.recv_buffer(0, 0, 0, 8)
    leaf = started("star", rank=1)
    with pytest.raises(ProtocolError, match="from root 0"):
        leaf.recv_buffer(2, 1, 0, 8)
    with pytest.raises(ProtocolError, match="from root 0"):
        leaf.recv_buffer(0, 0, 0, 8)
    with pytest.raises(ProtocolError, match="chunk 6"):
        leaf.recv_buffer(0, 1, 6, 8)
    view = leaf.recv_buffer(0, 1, 0, 8)
    with pytest.raises(ProtocolError, match="duplicate"):
        leaf.recv_buffer(0, 1, 0, 8)
    assert view.nbytes == 8


def test_star_root_waits_for_every_contribution_before_sending() -> None:
    inputs = [np.full(2, r + 1, dtype=np.int32) for r in range(3)]
    root, *_ = build("star", inputs, "sum")
    assert root.start() == []
    root.recv_buffer(2, 0, 0, 8)[:] = inputs[2].tobytes()
    assert root.on_receive(2, 0, 0) == []
    root.recv_buffer(1, 0, 0, 8)[:] = inputs[1].tobytes()
    actions = root.on_receive(1, 0, 0)
    sends = [a for a in actions if isinstance(a, Send)]
    assert [a.to for a in sends] == [1, 2]
    assert all(a.step == 1 and bytes(a.payload) == np.full(2, 6, np.int32).tobytes() for a in sends)
    assert actions[-1] == Complete()


# -- invalid arguments ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [RingAllReduce, StarAllReduce])
def test_invalid_arguments_are_refused(cls: type) -> None:
    f32 = np.zeros(4, dtype=np.float32)
    with pytest.raises(InvalidArgument, match="avg"):
        cls(0, 2, np.zeros(4, dtype=np.int32), "avg")
    with pytest.raises(InvalidArgument, match="unknown reduce op"):
        cls(0, 2, f32, "mean")
    with pytest.raises(InvalidArgument, match="unsupported dtype"):
        cls(0, 2, np.zeros(4, dtype=np.float64), "sum")
    with pytest.raises(InvalidArgument, match="1-D"):
        cls(0, 2, np.zeros((2, 2), dtype=np.float32), "sum")
    with pytest.raises(InvalidArgument, match="contiguous"):
        cls(0, 2, np.zeros(8, dtype=np.float32)[::2], "sum")
    ro = np.zeros(4, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(InvalidArgument, match="writable"):
        cls(0, 2, ro, "sum")
    with pytest.raises(InvalidArgument, match="numpy array"):
        cls(0, 2, [1.0, 2.0], "sum")
    with pytest.raises(InvalidArgument, match="outside world"):
        cls(2, 2, f32, "sum")
    with pytest.raises(InvalidArgument, match="world must be"):
        cls(0, 0, f32, "sum")
    with pytest.raises(InvalidArgument, match="chunk_bytes"):
        cls(0, 2, f32, "sum", None, 0)
    with pytest.raises(InvalidArgument, match="floating"):
        cls(0, 2, np.zeros(4, dtype=np.int64), "sum", FP16_TEST)


def test_star_root_must_be_in_the_world() -> None:
    with pytest.raises(InvalidArgument, match="root"):
        StarAllReduce(0, 2, np.zeros(4, dtype=np.float32), "sum", root=2)


def test_make_all_reduce_picks_by_name_and_size() -> None:
    assert ALGORITHMS == ("auto", "ring", "star", "direct")
    small = np.zeros(16, dtype=np.float32)
    big = np.zeros(1 << 17, dtype=np.float32)  # 512 KiB
    assert isinstance(make_all_reduce("auto", 0, 4, small, "sum"), StarAllReduce)
    assert isinstance(make_all_reduce("auto", 0, 4, big, "sum"), RingAllReduce)
    assert isinstance(make_all_reduce("auto", 0, 2, big, "sum"), StarAllReduce)
    assert isinstance(make_all_reduce("ring", 0, 4, small, "sum"), RingAllReduce)
    assert isinstance(make_all_reduce("direct", 2, 4, big, "sum"), DirectAllReduce)
    star = make_all_reduce("star", 1, 4, big, "sum", root=3)
    assert isinstance(star, StarAllReduce) and star.root == 3
    assert isinstance(
        make_all_reduce("auto", 0, 4, big, "sum", star_max_bytes=1 << 20), StarAllReduce
    )
    assert choose_algorithm("auto", 3, 256 * 1024) == "star"
    assert choose_algorithm("auto", 3, 256 * 1024 + 1) == "ring"
    with pytest.raises(InvalidArgument, match="unknown all-reduce algorithm"):
        make_all_reduce("tree", 0, 4, small, "sum")
