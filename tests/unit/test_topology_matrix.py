"""LinkMatrix: who measured what, which pair it lands on, eviction, the wire form."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collnet.errors import ProtocolError
from collnet.topology.matrix import LinkMatrix, LinkSample

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ids = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
figures = st.none() | st.floats(0, 1e11)


def test_a_report_fills_the_direction_the_reporter_received_and_the_rtt_both_ways() -> None:
    m = LinkMatrix()
    members = {"a", "b", "c"}
    # b measured 800 Mbit/s arriving from a, 5 s ago, and 20 ms of RTT to a.
    m.report("b", [LinkSample("a", 8e8, 5.0, 0.02)], now_s=100.0, members=members)
    assert m.bandwidth("a", "b") == 8e8
    assert m.bandwidth("b", "a") is None  # asymmetric links: the other way is unknown
    assert m.rtt("b", "a") == 0.02 and m.rtt("a", "b") == 0.02
    assert m.bandwidth("a", "c") is None and m.rtt("a", "c") is None
    rows = {(r["src"], r["dst"]): r for r in m.to_wire(now_s=101.0)}
    assert rows[("a", "b")]["bandwidth_age_s"] == 6.0  # measured at 95, not at 100
    assert rows[("b", "a")]["rtt_age_s"] == 1.0
    # The fresher RTT of the two ends wins.
    m.report("a", [LinkSample("b", None, 0.0, 0.03)], now_s=102.0, members=members)
    assert m.rtt("b", "a") == 0.03
    # A report without a figure keeps the one held.
    m.report("b", [LinkSample("a", None, 0.0, None)], now_s=103.0, members=members)
    assert m.bandwidth("a", "b") == 8e8


def test_only_pairs_of_members_are_held_and_departed_peers_are_evicted() -> None:
    m = LinkMatrix()
    m.report("x", [LinkSample("a", 1e9, 0.0, 0.01)], 0.0, {"a", "b"})  # reporter not a member
    m.report("a", [LinkSample("x", 1e9, 0.0, 0.01)], 0.0, {"a", "b"})  # peer not a member
    m.report("a", [LinkSample("a", 1e9, 0.0, 0.01)], 0.0, {"a", "b"})  # itself
    assert len(m) == 0
    members = {"a", "b", "c"}
    for src in members:
        others = [LinkSample(p, 1e9, 0.0, 0.01) for p in sorted(members - {src})]
        m.report(src, others, 0.0, members)
    assert len(m) == 6
    m.retain({"a", "b"})
    assert m.pairs() == [("a", "b"), ("b", "a")]
    assert m.bandwidth("c", "a") is None and m.rtt("a", "c") is None


@FAST
@given(
    st.dictionaries(
        st.tuples(ids, ids).filter(lambda p: p[0] != p[1]),
        st.tuples(figures, st.floats(0, 1e4), st.none() | st.floats(0, 600)),
        max_size=12,
    )
)
def test_the_wire_form_round_trips(entries: dict[tuple[str, str], Any]) -> None:
    m = LinkMatrix()
    members = {p for pair in entries for p in pair}
    for (src, dst), (bw, age, rtt) in entries.items():
        m.report(dst, [LinkSample(src, bw, age, None)], 1e6, members)
        m.report(src, [LinkSample(dst, None, 0.0, rtt)], 1e6, members)
    again = LinkMatrix.from_wire(m.to_wire(1e6), 1e6)
    assert again.pairs() == m.pairs()
    for src, dst in m.pairs():
        assert again.bandwidth(src, dst) == m.bandwidth(src, dst)
        assert again.rtt(src, dst) == m.rtt(src, dst)


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        ({"src": "a"}, "list"),
        ([["a", "b"]], "map"),
        ([{"src": "a", "dst": "a"}], "itself"),
        ([{"src": "a", "dst": "b"}, {"src": "a", "dst": "b"}], "repeated"),
        ([{"src": "", "dst": "b"}], "peer id"),
        ([{"src": "a", "dst": "b", "bandwidth_bps": -1.0}], "range"),
        ([{"src": "a", "dst": "b", "bandwidth_bps": math.inf}], "range"),
        ([{"src": "a", "dst": "b", "rtt_s": math.nan}], "range"),
        ([{"src": "a", "dst": "b", "rtt_s": True}], "number"),
        ([{"src": "a", "dst": "b", "rtt_s": "1"}], "number"),
        ([{"src": "a", "dst": "b", "rtt_age_s": -2}], "range"),
    ],
)
def test_malformed_rows_are_protocol_errors(rows: Any, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        LinkMatrix.from_wire(rows, 0.0)


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
rowish = st.dictionaries(
    st.sampled_from(["src", "dst", "bandwidth_bps", "rtt_s", "bandwidth_age_s", "rtt_age_s"]),
    anything | ids,
)


@FAST
@given(anything | st.lists(rowish, max_size=4))
def test_arbitrary_input_parses_or_raises_protocol_error_only(obj: Any) -> None:
    try:
        m = LinkMatrix.from_wire(obj, 0.0)
    except ProtocolError:
        return
    for src, dst in m.pairs():
        bw = m.bandwidth(src, dst)
        assert bw is None or (math.isfinite(bw) and bw >= 0)
