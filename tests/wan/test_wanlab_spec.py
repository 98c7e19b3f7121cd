"""wanlab's settings and the tc commands they become (no root needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wanlab.shaping import shaping_commands
from wanlab.spec import LabSpec, SpecError, parse_loss, parse_rate, parse_time


def test_units() -> None:
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("250mbit") == 250 * 10**6
    assert parse_time("100ms") == pytest.approx(0.1)
    assert parse_time("0.2s") == pytest.approx(0.2)
    assert parse_loss("0.1%") == pytest.approx(0.001)
    for bad in ("1 gbyte", "fast", "-1mbit", "0mbit"):
        with pytest.raises(SpecError):
            parse_rate(bad)
    with pytest.raises(SpecError):
        parse_loss("100%")


@given(st.integers(1, 10**6), st.sampled_from(["kbit", "mbit", "gbit"]))
def test_rate_round_trip(n: int, unit: str) -> None:
    scale = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}[unit]
    assert parse_rate(f"{n}{unit}") == n * scale


def test_two_data_centres() -> None:
    spec = LabSpec(hosts=4, rate_bit=10**9, rtt_s=0.1)
    spec.add_pair("0,1:rtt=2ms,rate=10gbit")
    spec.add_pair("2,3:rtt=2ms,rate=10gbit")
    assert spec.path(0, 1).delay_s == pytest.approx(0.001)
    assert spec.path(1, 0).rate_bit == 10 * 10**9
    assert spec.path(0, 2).delay_s == pytest.approx(0.05)
    assert spec.rate(0, 2) == 10**9
    assert spec.bottleneck_bit() == 10**9


def test_one_direction_and_access_links() -> None:
    spec = LabSpec(hosts=3, rate_bit=10**9, rtt_s=0.02)
    spec.add_pair("0>2:delay=70ms,loss=1%")
    spec.add_host("1:up=100mbit")
    assert spec.path(0, 2).delay_s == pytest.approx(0.07)
    assert spec.path(2, 0).delay_s == pytest.approx(0.01)
    assert spec.path(0, 2).loss == pytest.approx(0.01) and spec.path(2, 0).loss == 0
    assert spec.rate(1, 0) == 100 * 10**6 and spec.rate(0, 1) == 10**9
    assert spec.bottleneck_bit() == 100 * 10**6
    assert LabSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "bad", ["0,0:rtt=1ms", "0,9:rtt=1ms", "0,1:delay=1ms", "0>1:rtt=1ms", "0,1", "x,1:rate=1gbit"]
)
def test_bad_pairs(bad: str) -> None:
    with pytest.raises(SpecError):
        LabSpec(hosts=3).add_pair(bad)


def test_shaping_both_ends_and_pair_classes() -> None:
    spec = LabSpec(hosts=3, rate_bit=200 * 10**6, name="t")
    spec.add_pair("0,1:rate=50mbit")
    cmds = [" ".join(c) for c in shaping_commands(spec)]
    roots = [c for c in cmds if " root handle 1: htb" in c]
    # every host link, on the host's side and the router's side
    assert len(roots) == 6
    filters = [c for c in cmds if " u32 " in c]
    assert any("-n wanlab-t-h0 " in c and f"ip dst {spec.addr(1)}/32" in c for c in filters)
    assert any("-n wanlab-t-r " in c and "dev h1 " in c and f"ip src {spec.addr(0)}/32" in c
               for c in filters)  # fmt: skip
    assert len(filters) == 4  # 0->1 and 1->0, each on both ends
    assert not shaping_commands(LabSpec(hosts=2, rate_bit=None))
