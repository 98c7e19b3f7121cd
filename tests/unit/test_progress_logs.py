"""Progress lines of long operations, as JSON log lines (``--log-json``)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from collnet_daemon.logs import JsonFormatter
from collnet_daemon.progress import Progress, format_bytes


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.progress")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log, out
    log.removeHandler(handler)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_start_and_end_lines_are_json_objects_with_size_and_rate(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = json_log
    progress = Progress(log, "all_reduce 't1' (epoch 2, ring, none, 4 peers)", 512 << 20)
    progress.done()
    start, end = _lines(out)
    assert start["level"] == "info" and start["logger"] == "test.progress"
    assert start["msg"] == "all_reduce 't1' (epoch 2, ring, none, 4 peers): 512.0 MiB started"
    assert str(end["msg"]).startswith("all_reduce 't1' (epoch 2, ring, none, 4 peers): 512.0 MiB")
    assert "done in" in str(end["msg"]) and str(end["msg"]).endswith("GB/s)")


def test_failure_line_says_why(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = json_log
    Progress(log, "state sync", 1 << 30).failed("PeerLost: peer03 gone")
    assert re.fullmatch(
        r"state sync: 1\.0 GiB failed after [0-9.]+ s: PeerLost: peer03 gone",
        str(_lines(out)[-1]["msg"]),
    )


async def test_a_running_operation_logs_while_it_runs(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = json_log
    progress = Progress(log, "all_reduce 't2'", 300 << 20, every_s=0.01)
    async with asyncio.timeout(10):
        while not any("still running" in str(line["msg"]) for line in _lines(out)):
            await asyncio.sleep(0.01)
    progress.done()
    count = len(_lines(out))
    await asyncio.sleep(0.05)
    assert len(_lines(out)) == count, "progress lines went on after done()"


def test_sizes_are_readable() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 20) == "3.0 MiB"
    assert format_bytes(5 << 40) == "5120.0 GiB"
