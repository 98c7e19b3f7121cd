"""The direct all-reduce's own contract: who sends what to whom, and an owner's
fixed combining order (the shared tests run it beside the ring and the star)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ringsim import FP16_TEST, RingSim, build

from collnet.algo import Complete, DirectAllReduce, RingAllReduce, Send
from collnet.algo.direct import STEP_CONTRIBUTE, STEP_RESULT
from collnet.algo.partition import Partition
from collnet.errors import ProtocolError


def test_start_sends_each_owner_its_segment_and_nothing_of_the_own() -> None:
    buf = np.arange(12, dtype=np.float32)
    sched = DirectAllReduce(1, 3, buf, "sum", chunk_bytes=8)  # segments of 4, chunks of 2
    sends = sched.start()
    assert all(isinstance(a, Send) and a.step == STEP_CONTRIBUTE for a in sends)
    got = {(a.to, a.chunk): np.frombuffer(a.payload, np.float32).tolist() for a in sends}  # type: ignore[union-attr]
    assert got == {(2, 0): [8, 9], (2, 1): [10, 11], (0, 0): [0, 1], (0, 1): [2, 3]}
    # Its right neighbour first: no owner is every rank's first destination.
    assert [a.to for a in sends[:2]] == [2, 0]  # type: ignore[union-attr]


def test_an_owner_sends_a_result_only_after_every_contribution_of_that_chunk() -> None:
    inputs = [np.full(6, float(r + 1), dtype=np.float32) for r in range(3)]
    scheds = build("direct", inputs, "sum", chunk_bytes=8)  # segments of 2: one chunk
    for s in scheds:
        s.start()
    owner = scheds[0]
    view = owner.recv_buffer(2, STEP_CONTRIBUTE, 0, 8)
    view[:] = np.full(2, 3.0, dtype=np.float32).tobytes()
    assert owner.on_receive(2, STEP_CONTRIBUTE, 0) == []
    view = owner.recv_buffer(1, STEP_CONTRIBUTE, 0, 8)
    view[:] = np.full(2, 2.0, dtype=np.float32).tobytes()
    actions = owner.on_receive(1, STEP_CONTRIBUTE, 0)
    assert sorted(a.to for a in actions if isinstance(a, Send)) == [1, 2]
    assert all(a.step == STEP_RESULT for a in actions if isinstance(a, Send))
    assert inputs[0][:2].tolist() == [6.0, 6.0]


def test_messages_outside_the_schedule_are_protocol_errors() -> None:
    inputs = [np.zeros(12, dtype=np.float32) for _ in range(3)]
    scheds = build("direct", inputs, "sum", chunk_bytes=8)
    for s in scheds:
        s.start()
    s0 = scheds[0]
    with pytest.raises(ProtocolError, match="not a peer"):
        s0.recv_buffer(0, STEP_CONTRIBUTE, 0, 8)
    with pytest.raises(ProtocolError, match="not a peer"):
        s0.recv_buffer(3, STEP_CONTRIBUTE, 0, 8)
    with pytest.raises(ProtocolError, match="step 2"):
        s0.recv_buffer(1, 2, 0, 8)
    with pytest.raises(ProtocolError, match="does not exist"):
        s0.recv_buffer(1, STEP_CONTRIBUTE, 2, 8)
    with pytest.raises(ProtocolError):
        s0.recv_buffer(1, STEP_CONTRIBUTE, 0, 12)  # a chunk of 2 floats is 8 bytes
    s0.recv_buffer(1, STEP_RESULT, 1, 8)
    with pytest.raises(ProtocolError, match="duplicate"):
        s0.recv_buffer(1, STEP_RESULT, 1, 8)
    with pytest.raises(ProtocolError, match="unannounced"):
        s0.on_receive(2, STEP_RESULT, 0)


@settings(max_examples=40, deadline=None)
@given(
    world=st.integers(min_value=2, max_value=6),
    n=st.integers(min_value=0, max_value=70),
    chunk=st.sampled_from([4, 8, 20, 1 << 20]),
    seeds=st.lists(st.integers(min_value=0, max_value=2**32), min_size=2, max_size=3),
    quantized=st.booleans(),
)
def test_the_result_does_not_depend_on_arrival_order(
    world: int, n: int, chunk: int, seeds: list[int], quantized: bool
) -> None:
    rng = np.random.default_rng(n)
    base = [rng.standard_normal(n).astype(np.float32) * 1e3 for _ in range(world)]
    results = []
    for seed in seeds:
        inputs = [b.copy() for b in base]
        sim = RingSim(
            build("direct", inputs, "avg", FP16_TEST if quantized else None, chunk),
            random.Random(seed),
        )
        sim.start()
        sim.run()
        assert all(isinstance(sim.outcome[r], Complete) for r in range(world))
        results.append(inputs[0].tobytes())
        assert all(x.tobytes() == results[-1] for x in inputs)
    assert len(set(results)) == 1


def test_an_owner_holds_few_contributions_when_they_arrive_in_order() -> None:
    world, n = 4, 4 * 64
    inputs = [np.ones(n, dtype=np.float32) for _ in range(world)]
    scheds = build("direct", inputs, "sum", chunk_bytes=4 * 4)  # 16 chunks per segment
    part = Partition(n, world, 4)
    for s in scheds:
        s.start()
    owner = scheds[0]
    # Contributions in the combining order (left neighbour first): nothing waits.
    for src in (3, 2, 1):
        for c in range(part.num_chunks(0)):
            owner.recv_buffer(src, STEP_CONTRIBUTE, c, 16)[:] = bytes(16)  # not scratch garbage
            owner.on_receive(src, STEP_CONTRIBUTE, c)
            assert len(owner._pending) == 0


def test_the_direct_schedule_shares_a_node_link_among_all_its_peers_the_ring_does_not() -> None:
    buf = np.zeros(1000, dtype=np.float32)
    for world in (1, 2, 4, 7):
        direct = DirectAllReduce(0, world, buf.copy(), "sum")
        assert direct.fan == max(1, world - 1)
        assert RingAllReduce(0, world, buf.copy(), "sum").fan == 1


def test_which_schedules_share_a_node_link_among_their_links() -> None:
    from collnet.algo.broadcast import TreeBroadcast
    from collnet.algo.star import StarAllReduce

    buf = np.zeros(1000, dtype=np.float32)
    for world in (2, 3, 5):
        many = world > 2
        assert DirectAllReduce(1, world, buf.copy(), "sum").shares_node_link is many
        assert StarAllReduce(1, world, buf.copy(), "sum").shares_node_link is many
        assert StarAllReduce(1, world, buf.copy(), "sum").fan == 1  # stripes not narrowed
        star = TreeBroadcast(1, world, buf.copy(), 0, tree="star")
        assert star.shares_node_link is many
        assert not TreeBroadcast(1, world, buf.copy(), 0, tree="chain").shares_node_link
        assert not RingAllReduce(1, world, buf.copy(), "sum").shares_node_link
