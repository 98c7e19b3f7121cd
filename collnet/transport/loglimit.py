"""Log lines a remote party can trigger, rate-limited per source.

Anything a peer or a stranger can make this process log (a protocol error, a
refused fetch, a failed handshake) is one cheap message for them and one
line for us; unlimited, that is a way to fill a disk or drown the lines that
matter. A ``LogLimiter`` lets through at most ``per_interval`` lines from one
source (a remote host, or a peer id) per ``interval_s``. The first line it
holds back says so, once; the others are counted, and the next line from that
source after the interval says how many were suppressed. Sources are kept in
a bounded LRU, so a party that rotates its claimed ids cannot grow the
limiter either.

``REMOTE`` is the process's one limiter for such lines: a budget per source
is only worth anything if every path that source can trigger draws on it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Sources remembered at once; the least recently heard is forgotten first.
MAX_SOURCES = 1024


@dataclass(slots=True)
class _Window:
    started_s: float
    lines: int = 0
    suppressed: int = 0


class LogLimiter:
    """At most ``per_interval`` lines per source per ``interval_s``; see the module docstring."""

    def __init__(
        self,
        per_interval: int = 50,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_interval = per_interval
        self.interval_s = interval_s
        self.clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def log(
        self, logger: logging.Logger, level: int, source: object, msg: str, *args: object
    ) -> bool:
        """Log ``msg % args`` unless ``source`` has used up its lines; True if logged."""
        if not logger.isEnabledFor(level):
            return False
        key = str(source)[:200]
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.started_s >= self.interval_s:
            if window is not None and window.suppressed:
                logger.log(
                    level,
                    "%d more lines from %s were suppressed in %.0fs",
                    window.suppressed,
                    key,
                    now - window.started_s,
                )
            window = self._windows[key] = _Window(now)
        self._windows.move_to_end(key)
        while len(self._windows) > MAX_SOURCES:
            self._windows.popitem(last=False)
        if window.lines >= self.per_interval:
            if not window.suppressed:
                logger.log(
                    level,
                    "%s: over %d lines in %.0fs; suppressing its lines for the rest of them",
                    key,
                    self.per_interval,
                    self.interval_s,
                )
            window.suppressed += 1
            return False
        window.lines += 1
        logger.log(level, msg, *args)
        return True

    def warning(self, logger: logging.Logger, source: object, msg: str, *args: object) -> bool:
        return self.log(logger, logging.WARNING, source, msg, *args)

    def info(self, logger: logging.Logger, source: object, msg: str, *args: object) -> bool:
        return self.log(logger, logging.INFO, source, msg, *args)


def host_of(peername: object) -> str:
    """The remote host of a socket's peername (the source of what it sends)."""
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername)


# The process's limiter of lines remote parties can trigger; see the module docstring.
REMOTE = LogLimiter()
