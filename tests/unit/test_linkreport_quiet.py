"""When the link reporter lets a bandwidth probe out: only once the daemon has
been quiet (no collective running, none started) for ``QUIET_TICKS`` intervals."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from collnet_daemon.linkreport import PROBE_ROUND_TICKS, QUIET_TICKS, LinkReporter
from hypothesis import given
from hypothesis import strategies as st


class Daemon:
    def __init__(self) -> None:
        self.running = 0
        self.started = 0


def reporter(d: Daemon, interval_s: float = 2.0) -> LinkReporter:
    return LinkReporter(
        "d0",
        interval_s,
        cast(Any, None),
        cast(Any, None),
        lambda: d.running > 0,
        activity=lambda: d.started,
    )


def test_a_daemon_is_quiet_only_after_the_quiet_ticks() -> None:
    d = Daemon()
    r = reporter(d)
    assert not r._quiet(0.0)
    assert not r._quiet(2.0 * QUIET_TICKS - 0.1)
    assert r._quiet(2.0 * QUIET_TICKS)


def test_collectives_between_two_looks_restart_the_quiet_period() -> None:
    d = Daemon()
    r = reporter(d)
    r._quiet(0.0)
    assert r._quiet(10.0)
    d.started += 1  # began and ended between two ticks: never seen running
    assert not r._quiet(12.0)
    assert not r._quiet(12.0 + 2.0 * QUIET_TICKS - 0.1)
    assert r._quiet(12.0 + 2.0 * QUIET_TICKS)


def test_a_running_collective_is_never_quiet() -> None:
    d = Daemon()
    r = reporter(d)
    r._quiet(0.0)
    d.running = 1
    assert not r._quiet(100.0)
    d.running = 0
    assert not r._quiet(101.0)
    assert r._quiet(101.0 + 2.0 * QUIET_TICKS)


def test_without_an_activity_count_only_running_collectives_count() -> None:
    d = Daemon()
    r = LinkReporter("d0", 2.0, cast(Any, None), cast(Any, None), lambda: d.running > 0)
    assert r._quiet(0.0)
    d.running = 1
    assert not r._quiet(1.0)


@given(st.sets(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=2, max_size=12))
def test_in_each_round_of_first_bursts_every_peer_receives_one(ids: set[str]) -> None:
    """The daemons' k-th bursts (each to the k-th link of its rotation) go to
    distinct peers: none reads a link shared with another burst."""
    rotations = {}
    for me in ids:
        r = LinkReporter(me, 2.0, cast(Any, None), cast(Any, None), lambda: False)
        rotations[me] = r._rotation(dict.fromkeys(ids - {me}, cast(Any, None)))
        assert sorted(rotations[me]) == sorted(ids - {me})
    for k in range(len(ids) - 1):
        targets = [rotations[me][k] for me in ids]
        assert len(set(targets)) == len(ids)


@given(
    st.sets(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=2, max_size=12),
    st.integers(0, 10**9),
    st.floats(-0.2, 0.2),
)
def test_probe_rounds_start_together_and_send_each_peer_one_burst(
    ids: set[str], tick: int, jitter_s: float
) -> None:
    """At a round's first tick every daemon may probe exactly one peer, no two the
    same one, whatever the tick (and a wake-up a little early or late); at its
    other ticks none may."""
    interval = 2.0
    targets = []
    for me in ids:
        mesh = SimpleNamespace(links=dict.fromkeys(ids - {me}))
        r = LinkReporter(me, interval, cast(Any, mesh), cast(Any, None), lambda: False)
        wall = (tick * PROBE_ROUND_TICKS) * interval + jitter_s
        targets.append(r.round_target(wall))
        for later in range(1, PROBE_ROUND_TICKS):
            assert r.round_target(wall + later * interval) is None
    assert None not in targets and len(set(targets)) == len(ids)
    # Over n - 1 rounds each daemon targets every other peer once.
    me = min(ids)
    mesh = SimpleNamespace(links=dict.fromkeys(ids - {me}))
    r = LinkReporter(me, interval, cast(Any, mesh), cast(Any, None), lambda: False)
    rounds = range(tick, tick + len(ids) - 1)
    assert {r.round_target(k * PROBE_ROUND_TICKS * interval) for k in rounds} == ids - {me}
