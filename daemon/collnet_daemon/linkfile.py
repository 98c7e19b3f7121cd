"""Link figures from a file (``collnet coordinator --link-matrix-file``).

For labs and tests that need the coordinator to plan against known links (a
deliberately slow pair on loopback, say) rather than measured ones. The file
is a JSON list of rows in the form ``collnet status`` shows the measured
matrix (``LinkMatrix.to_wire``: ``src``, ``dst``, ``bandwidth_bps`` in bits/s,
``rtt_s``); it is read again whenever it changes, at the next
update_topology, so a test can change the links while the world runs. A file
that cannot be read or parsed keeps the figures held before, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time

from collnet.errors import ProtocolError
from collnet.topology.matrix import LinkMatrix

log = logging.getLogger(__name__)


class LinkFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.matrix = LinkMatrix()
        self._stamp: tuple[int, int] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Read the file again if it changed since the last read."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                rows = json.load(f)
            self.matrix = LinkMatrix.from_wire(rows, time.monotonic(), self.path)
            self._stamp = stamp
            log.info("link figures from %s: %d pairs", self.path, len(self.matrix))
        except (OSError, ValueError, ProtocolError) as exc:
            log.warning("link figures from %s not read: %s", self.path, exc)
