"""The heartbeat failure detector, driven with a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collnet.membership.liveness import Liveness


def test_silence_longer_than_timeout_expires_and_traffic_resets_it() -> None:
    lv = Liveness(interval_s=0.5, floor_s=2.0, ceiling_s=10.0)
    lv.start(100.0)
    assert lv.timeout_s == 2.0
    assert not lv.expired(101.9)
    assert lv.expired(102.1)
    lv.heard(102.05)
    assert not lv.expired(104.0)


def test_timeout_adapts_to_round_trips_within_floor_and_ceiling() -> None:
    lv = Liveness(interval_s=0.5, floor_s=2.0, ceiling_s=10.0)
    lv.start(0.0)
    t = 0.0
    for _ in range(20):  # a steady 0.6 s RTT link
        seq = lv.ping(t)
        assert lv.pong(seq, t + 0.6) == pytest.approx(0.6)
        t += 1.0
    assert lv.srtt_s == pytest.approx(0.6, rel=1e-3)
    assert 2.0 < lv.timeout_s < 4.0  # interval + 4 * (srtt + 4 * rttvar), rttvar decays
    for _ in range(5):  # RTT jumps: the timeout grows, up to the ceiling
        seq = lv.ping(t)
        lv.pong(seq, t + 5.0)
        t += 6.0
    assert lv.timeout_s == 10.0


def test_unknown_or_future_pongs_do_not_corrupt_the_estimate() -> None:
    lv = Liveness()
    lv.start(0.0)
    assert lv.pong(42, 1.0) is None
    seq = lv.ping(5.0)
    assert lv.pong(seq, 4.0) is None  # clock went backwards
    assert lv.srtt_s is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Liveness(interval_s=0.5, floor_s=3.0, ceiling_s=1.0)
    with pytest.raises(ValueError):
        Liveness(interval_s=0.0)


@given(st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=50))
def test_timeout_always_within_bounds(rtts: list[float]) -> None:
    lv = Liveness(interval_s=0.5, floor_s=2.0, ceiling_s=10.0)
    lv.start(0.0)
    t = 0.0
    for rtt in rtts:
        seq = lv.ping(t)
        lv.pong(seq, t + rtt)
        t += rtt + 0.5
        assert 2.0 <= lv.timeout_s <= 10.0
