"""Link reports, their answers, reachability rows and PROBE pieces on the wire;
the probe policy and the RTT filter."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collnet.errors import ProtocolError
from collnet.topology.matrix import LinkSample
from collnet.topology.probe import (
    DEFAULT_BURST_BYTES,
    MAX_BURST_BYTES,
    MAX_WARM_BYTES,
    MIN_BURST_BYTES,
    WARM_BPS,
    BurstPolicy,
    ProbeState,
)
from collnet.topology.rtt import MinRtt
from collnet.wire import FrameKind, FrameReader, Limits, frame_bytes
from collnet.wire import control as wire
from collnet.wire.topology import (
    MAX_PROBE_PIECE_BYTES,
    LinkAck,
    LinkReport,
    ProbePiece,
    Reachability,
    TopologyStatus,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,11}", fullmatch=True)
samples = st.builds(
    LinkSample,
    ids,
    st.none() | st.floats(0, 1e12),
    st.floats(0, 1e6),
    st.none() | st.floats(0, 600),
)
reports = st.lists(samples, max_size=8, unique_by=lambda s: s.peer).map(
    lambda s: LinkReport(tuple(s))
)


def through_a_frame(meta: Any) -> Any:
    reader = FrameReader(Limits())
    (frame,) = reader.feed(frame_bytes(FrameKind.CONTROL, meta))
    return frame.meta


@FAST
@given(st.integers(0, 2**32), reports)
def test_a_link_report_round_trips_as_a_control_request(rid: int, report: LinkReport) -> None:
    sent = wire.Request(rid, report)
    meta = through_a_frame(sent.to_wire())
    assert meta["t"] == "links"
    assert wire.Request.from_wire(meta, b"") == sent


@pytest.mark.parametrize("ack", [LinkAck(), LinkAck(True), LinkAck(False, "connection refused")])
def test_a_link_ack_round_trips_as_a_reply(ack: LinkAck) -> None:
    sent = wire.Reply(7, ack)
    assert wire.Reply.from_wire(through_a_frame(sent.to_wire()), b"", LinkAck) == sent


@pytest.mark.parametrize(
    ("links", "why"),
    [
        ("x", "list"),
        ([["a", 1.0, 0.0]], "entry"),
        ([["a", 1.0, 0.0, 0.1, 5]], "entry"),
        ([["", 1.0, 0.0, 0.1]], "peer id"),
        ([["a", 1.0, 0.0, 0.1], ["a", 2.0, 0.0, 0.1]], "twice"),
        ([["a", -1.0, 0.0, 0.1]], "range"),
        ([["a", 1.0, -1.0, 0.1]], "range"),
        ([["a", 1.0, 0.0, 601.0]], "range"),
        ([["a", False, 0.0, 0.1]], "number"),
        ([["a", 1.0, 0.0, 0.1]] * 1025, "at most"),
    ],
)
def test_malformed_link_reports_are_protocol_errors(links: Any, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        wire.Request.from_wire({"t": "links", "id": 1, "links": links}, b"")


def test_a_link_report_carries_no_payload() -> None:
    with pytest.raises(ProtocolError, match="payload"):
        wire.Request.from_wire({"t": "links", "id": 1, "links": []}, b"x")


@pytest.mark.parametrize(
    "msg", [{"reachable": 1}, {"reachable": "yes"}, {"error": 3}, {"error": "x" * 301}]
)
def test_malformed_link_acks_are_protocol_errors(msg: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        LinkAck.from_wire(msg)


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=16,
)


@FAST
@given(anything, anything)
def test_arbitrary_reports_and_status_topology_parse_or_raise_protocol_error_only(
    links: Any, reach: Any
) -> None:
    for parse in (
        lambda: wire.Request.from_wire({"t": "links", "id": 1, "links": links}, b""),
        lambda: TopologyStatus.from_wire({"links": links, "reachability": reach}),
        lambda: LinkAck.from_wire({"reachable": links, "error": reach}),
        lambda: ProbePiece.from_wire(links, 0),
    ):
        with contextlib.suppress(ProtocolError):
            parse()


def test_status_topology_round_trips_and_is_absent_from_an_older_status() -> None:
    rows = [Reachability("a", "10.0.0.1:1", False, "refused"), Reachability("b", "h:2", True)]
    status = {"links": [{"src": "a", "dst": "b", "bandwidth_bps": 1e9, "rtt_s": 0.1}],
              "reachability": [r.to_wire() for r in rows]}  # fmt: skip
    topo = TopologyStatus.from_wire(status)
    assert topo is not None and topo.reachability == tuple(rows)
    assert topo.links.bandwidth("a", "b") == 1e9 and topo.links.rtt("b", "a") == 0.1
    assert TopologyStatus.from_wire({"epoch": 1}) is None


@pytest.mark.parametrize(
    ("meta", "size", "why"),
    [
        ([0, 0, 1], MAX_PROBE_PIECE_BYTES + 1, "over"),
        ([0, 1, 1], 10, "metadata"),
        ([0, 0, 65], 10, "metadata"),
        ([0, -1, 1], 10, "metadata"),
        ([0, 0], 10, "metadata"),
        ({"seq": 0}, 10, "metadata"),
        ([0, True, 2], 10, "metadata"),
        ([0, 1, 2, 2], 10, "metadata"),  # every piece warm: nothing to time
        ([0, 1, 2, 1, 0], 10, "metadata"),
        ([0, 1, 2, -1], 10, "metadata"),
    ],
)
def test_probe_pieces_are_bounded_and_parsed_strictly(meta: Any, size: int, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        ProbePiece.from_wire(meta, size)
    assert ProbePiece.from_wire([3, 1, 2], MAX_PROBE_PIECE_BYTES) == ProbePiece(3, 1, 2)
    piece = ProbePiece.from_wire([3, 1, 4, 2], 10)
    assert piece == ProbePiece(3, 1, 4, 2) and not piece.timed
    assert ProbePiece.from_wire(piece.to_wire(), 10) == piece
    assert ProbePiece(3, 2, 4, 2).timed and ProbePiece(3, 0, 1).timed


def test_a_new_idle_link_gets_one_burst_then_only_when_no_traffic_refreshed_it() -> None:
    policy = BurstPolicy(min_interval_s=60.0, fresh_s=120.0)
    state = ProbeState()
    assert policy.burst_bytes(state, 0.0, busy=True, rtt_s=1e-4) == 0  # never in a collective
    assert policy.burst_bytes(state, 0.0, busy=False) == 0  # the first pings not answered yet
    assert policy.burst_bytes(state, 0.0, busy=False, rtt_s=1e-4) == DEFAULT_BURST_BYTES
    state.burst_s = 0.0
    assert policy.burst_bytes(state, 30.0, busy=False, rtt_s=1e-4) == 0  # rate-limited
    state.saw_sent(64 << 20, 50.0)  # a collective moved data over it
    assert policy.burst_bytes(state, 100.0, busy=False, rtt_s=1e-4) == 0  # measured that
    assert policy.burst_bytes(state, 171.0, busy=False, rtt_s=1e-4) == DEFAULT_BURST_BYTES
    assert policy.burst_bytes(state, 171.0, busy=False) == DEFAULT_BURST_BYTES


def test_untimed_traffic_going_out_late_is_not_taken_for_traffic_that_refreshed_it() -> None:
    state = ProbeState(sent_bytes=100 << 20)
    # A direct all-reduce queued 60 MiB, untimed: the counter dips by what the
    # kernel has not taken yet, then climbs back as it goes out.
    state.saw_sent(50 << 20, 10.0)
    state.saw_sent(100 << 20, 12.0)
    assert state.traffic_s is None
    state.saw_sent(164 << 20, 14.0)  # then a ring's 64 MiB, timed
    assert state.traffic_s == 14.0


@given(st.one_of(st.none(), st.floats(1e6, 1e11)), st.floats(0.005, 1.0))
def test_a_long_path_gets_a_burst_that_outlasts_slow_start(
    bandwidth_bps: float | None, rtt_s: float
) -> None:
    # Sized from a slow-start-bound estimate, the next burst would be as short.
    assert BurstPolicy().burst_bytes(ProbeState(), 0.0, False, bandwidth_bps, rtt_s) == (
        MAX_BURST_BYTES
    )


@given(st.one_of(st.none(), st.floats(1e6, 1e11)), st.one_of(st.none(), st.floats(1e-5, 1.0)))
def test_only_a_long_path_warms_up_for_its_rate_within_bounds(
    bandwidth_bps: float | None, rtt_s: float | None
) -> None:
    policy = BurstPolicy()
    warm = policy.warm_bytes(bandwidth_bps, rtt_s)
    if rtt_s is None or rtt_s < policy.long_rtt_s:
        assert warm == 0
        return
    assert 0 < warm <= MAX_WARM_BYTES
    # Twice the BDP at twice the estimate (1 Gbit/s before one), unless capped.
    bps = WARM_BPS if bandwidth_bps is None else 2 * bandwidth_bps
    assert warm == min(MAX_WARM_BYTES, int(2 * bps / 8 * rtt_s))


def test_the_first_warm_up_of_a_long_fat_path_covers_a_gigabit() -> None:
    # 1 Gbit/s at 100 ms: 25 MB take a new connection through its start.
    assert BurstPolicy().warm_bytes(None, 0.1) == 25_000_000
    # An estimate read low (a cold 250 Mbit/s) still warms for twice that.
    assert BurstPolicy().warm_bytes(250e6, 0.1) == 12_500_000
    assert BurstPolicy().warm_bytes(None, 0.001) == 0


@given(st.floats(1e6, 1e11), st.floats(1e-5, 0.0049))
def test_a_burst_is_bdp_sized_within_bounds(bandwidth_bps: float, rtt_s: float) -> None:
    policy = BurstPolicy()
    n = policy.burst_bytes(ProbeState(), 0.0, False, bandwidth_bps, rtt_s)
    assert MIN_BURST_BYTES <= policy.min_bytes <= n <= MAX_BURST_BYTES
    bdp = bandwidth_bps / 8 * rtt_s
    if policy.min_bytes < 2 * bdp < MAX_BURST_BYTES:
        assert abs(n - 2 * bdp) <= 2  # BDP-sized, give or take rounding


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.floats(0.0, 20.0), st.floats(-0.1, 1.0)),
        max_size=60,
    ),
    st.integers(1, 6),
)
def test_min_rtt_is_the_minimum_of_the_kept_samples_whatever_the_order(
    steps: list[tuple[bool, float, float]], max_samples: int
) -> None:
    """The running minimum against a plain scan of the same samples."""
    f = MinRtt(window_s=5.0, max_samples=max_samples)
    kept: list[tuple[float, float]] = []
    now = 0.0
    for is_sample, advance, rtt in steps:
        now += advance
        if is_sample:
            f.sample(rtt, now)
            if rtt >= 0:
                kept = [*kept, (now, rtt)][-max_samples:]
            continue
        while len(kept) > 1 and now - kept[0][0] > 5.0:
            kept.pop(0)
        want = None
        if kept:
            inside = now - kept[0][0] <= 5.0
            want = min(r for _, r in kept) if inside else kept[-1][1]
        assert f.value(now) == want


def test_min_rtt_ignores_queueing_and_follows_a_slower_path_after_the_window() -> None:
    f = MinRtt(window_s=10.0, max_samples=8)
    assert f.value(0.0) is None
    f.sample(0.100, 0.0)
    f.sample(0.400, 1.0)  # a pong queued behind a transfer
    assert f.value(2.0) == 0.100
    f.sample(0.200, 12.0)  # the path itself got slower; the fast sample aged out
    assert f.value(12.5) == 0.200
    assert f.value(100.0) == 0.200  # a quiet spell keeps the last estimate
    for i in range(20):
        f.sample(1.0, 100.0 + i)
    assert len(f._samples) <= 8
