"""LogLimiter: lines a remote source can trigger are bounded per interval."""

from __future__ import annotations

import logging

import pytest

from collnet.transport.loglimit import MAX_SOURCES, LogLimiter, host_of

log = logging.getLogger("test.loglimit")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_source_gets_its_lines_then_one_notice_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limiter = LogLimiter(per_interval=3, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.loglimit"):
        logged = [limiter.warning(log, "10.0.0.9", "bad frame %d", i) for i in range(1000)]
        assert logged.count(True) == 3
        assert limiter.warning(log, "10.0.0.8", "another source") is True
        clock.now += 10.0
        assert limiter.warning(log, "10.0.0.9", "bad frame again") is True
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["bad frame 0", "bad frame 1", "bad frame 2"]
    assert "10.0.0.9: over 3 lines" in lines[3]
    assert lines[4:] == [
        "another source",
        "997 more lines from 10.0.0.9 were suppressed in 10s",
        "bad frame again",
    ]


def test_sources_are_remembered_in_a_bounded_lru() -> None:
    limiter = LogLimiter(per_interval=1, clock=Clock())
    for i in range(MAX_SOURCES * 3):
        limiter.warning(log, f"peer-{i}", "claimed id")
    assert len(limiter._windows) == MAX_SOURCES


def test_disabled_levels_cost_nothing() -> None:
    limiter = LogLimiter(per_interval=1, clock=Clock())
    assert limiter.log(log, logging.DEBUG, "x", "quiet") is False
    assert not limiter._windows


def test_host_of_a_peername() -> None:
    assert host_of(("127.0.0.1", 5555)) == "127.0.0.1"
    assert host_of(None) == "None"
