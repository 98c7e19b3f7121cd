"""Shared-memory segments of this node's trainers, mapped by the daemon.

A trainer names a segment (and an offset, dtype and count) in its request;
the daemon maps the segment once and keeps it until the trainer releases it
or the daemon stops, so a tensor reduced every step costs one ``mmap``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from collnet.transport.shm import SharedBuffer


class SharedBuffers:
    """Segments mapped by this daemon, by name."""

    def __init__(self) -> None:
        self._mapped: dict[str, SharedBuffer] = {}

    def array(
        self, name: str, dtype: npt.DTypeLike, count: int, offset: int = 0
    ) -> npt.NDArray[Any]:
        """``count`` elements of ``dtype`` at ``offset`` in segment ``name``."""
        buf = self._mapped.get(name)
        if buf is None:
            buf = self._mapped[name] = SharedBuffer.attach(name)
        return buf.array(np.dtype(dtype), count, offset)

    def adopt(self, buf: SharedBuffer) -> None:
        """Serve ``buf`` (one the daemon made itself) under its name."""
        self._mapped[buf.name] = buf

    def release(self, name: str) -> None:
        buf = self._mapped.pop(name, None)
        if buf is not None:
            buf.close()

    def close(self) -> None:
        for buf in self._mapped.values():
            buf.close()
        self._mapped.clear()
