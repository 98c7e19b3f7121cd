"""Progress lines for long operations: a start line, one every ``every_s`` while
it runs, and an end line with the rate.

Operators watching a 2 GiB all-reduce crawl over a WAN link need to see that
it runs and how fast; short operations stay quiet (callers decide what is
long, e.g. by size). Lines go to the caller's logger at INFO, so ``--log-json``
makes each of them one JSON object.
"""

from __future__ import annotations

import asyncio
import logging
import time


def format_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


class Progress:
    """One long operation's progress lines (see the module docstring)."""

    def __init__(self, log: logging.Logger, what: str, nbytes: int, every_s: float = 10.0) -> None:
        self.log = log
        self.what = what
        self.nbytes = nbytes
        self.every_s = every_s
        self.started_s = time.perf_counter()
        self._timer: asyncio.TimerHandle | None = None
        log.info("%s: %s started", what, format_bytes(nbytes))
        self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): start and end lines only
            return
        self._timer = loop.call_later(self.every_s, self._tick)

    def _tick(self) -> None:
        self.log.info(
            "%s: %s still running after %.0f s",
            self.what,
            format_bytes(self.nbytes),
            time.perf_counter() - self.started_s,
        )
        self._schedule()

    def _stop(self) -> float:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return time.perf_counter() - self.started_s

    def done(self) -> None:
        elapsed_s = self._stop()
        self.log.info(
            "%s: %s done in %.2f s (%.3f GB/s)",
            self.what,
            format_bytes(self.nbytes),
            elapsed_s,
            self.nbytes / max(elapsed_s, 1e-9) / 1e9,
        )

    def failed(self, why: object) -> None:
        elapsed_s = self._stop()
        self.log.info(
            "%s: %s failed after %.2f s: %s", self.what, format_bytes(self.nbytes), elapsed_s, why
        )
