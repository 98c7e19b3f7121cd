"""The shared memory the SDK creates, and where any array lies in it.

Two kinds of segments, both created (and in the end unlinked) by this
process and mapped by the daemon on first use:

- arrays from ``empty``: the caller's tensors live in them, so the daemon
  reduces them in place with no copy;
- staging segments: a tensor that lives elsewhere (a plain numpy array, a
  CUDA tensor) is copied into one for the daemon and back. They are pooled;
  one lent to a request returns to the pool when the request is done with it
  and never while the daemon may still write into it.

Any array whose bytes lie inside one of our segments (a slice, a torch
tensor over an SDK array) is located by address, not by ``arr.base``: a torch
tensor gives back numpy views with unrelated bases.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from collnet.errors import DaemonUnavailable
from collnet.transport.shm import SharedBuffer

# A staging segment and its bytes.
Staging: TypeAlias = tuple[SharedBuffer, npt.NDArray[Any]]


class SharedMemory:
    """This SDK's segments: see the module docstring."""

    def __init__(self) -> None:
        # id(base ndarray) -> (its segment, that ndarray). Holding the ndarray keeps
        # its id from being reused by an unrelated array once the caller drops it;
        # a reused id would send a plain array's all-reduce to a stale segment.
        self.segments: dict[int, tuple[SharedBuffer, npt.NDArray[Any]]] = {}
        # Start addresses of the mapped segments (sorted) and the segment at each.
        self._starts: list[int] = []
        self._by_start: dict[int, SharedBuffer] = {}
        self.pool: list[Staging] = []  # staging segments free to lend
        # Every staging segment, pooled or lent: close() frees them all, also
        # those of requests that were never waited for.
        self.staging_made: dict[str, SharedBuffer] = {}
        self.closed = False
        # close() may come from another thread than the collectives (a torch
        # group's worker outliving its stop timeout): a segment made after
        # close would never be unlinked.
        self._lock = threading.Lock()

    def _made(self, nbytes: int) -> SharedBuffer:
        """A new segment, or DaemonUnavailable once closed (caller holds the lock)."""
        if self.closed:
            raise DaemonUnavailable("this Comm is closed")
        return SharedBuffer.create(nbytes)

    def empty(
        self, shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float32
    ) -> npt.NDArray[Any]:
        """An array in a new segment of its own."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape))
        with self._lock:
            seg = self._made(n * dt.itemsize)
            base = seg.array(dt, n)
            self.segments[id(base)] = (seg, base)
            start = int(base.__array_interface__["data"][0])
            bisect.insort(self._starts, start)
            self._by_start[start] = seg
        return base.reshape(shape)

    def locate(self, arr: npt.NDArray[Any]) -> tuple[SharedBuffer, int] | None:
        """The segment and offset of ``arr``'s bytes, if they are contiguous in one
        of the ``empty`` segments."""
        if not arr.flags.c_contiguous:
            return None
        addr = int(arr.__array_interface__["data"][0])
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start = self._starts[i]
        seg = self._by_start[start]
        if addr + arr.nbytes > start + seg.nbytes:
            return None
        return seg, addr - start

    def stage(self, nbytes: int) -> Staging:
        """A staging segment of at least ``nbytes``, lent until ``unstage``."""
        with self._lock:
            for i, (seg, _) in enumerate(self.pool):
                if seg.nbytes >= nbytes:
                    return self.pool.pop(i)
            seg = self._made(nbytes)
            self.staging_made[seg.name] = seg
        return seg, seg.array(np.uint8, nbytes)

    def unstage(self, staging: Staging) -> None:
        """``staging`` is no longer the daemon's: back to the pool (freed once closed).

        A segment the daemon may still write into is never given back: it is
        freed by ``close``.
        """
        with self._lock:
            if not self.closed:
                self.pool.append(staging)
                return
        staging[0].close()

    def names(self) -> list[str]:
        """Every segment this SDK created: the daemon may map any of them."""
        with self._lock:
            return [seg.name for seg, _ in self.segments.values()] + list(self.staging_made)

    def close(self) -> None:
        """Free every segment (unlinked; a segment's pages go once nobody maps it)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            # Drop our references to the mapped arrays first, so a segment whose
            # arrays the caller no longer holds is unmapped right away.
            segments = [seg for seg, _ in self.segments.values()]
            segments += self.staging_made.values()
            self.segments.clear()
            self._starts.clear()
            self._by_start.clear()
            self.pool.clear()
            self.staging_made.clear()
        for seg in segments:
            seg.close()
