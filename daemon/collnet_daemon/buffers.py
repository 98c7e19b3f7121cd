"""Shared-memory segments of this node's trainers, mapped by the daemon.

A trainer names a segment (and an offset, dtype and count) in its request;
the daemon maps the segment once and keeps it until the trainer releases it
or the daemon stops, so a tensor reduced every step costs one ``mmap``.

Whose request it is comes from the connection it arrived on: the IPC server
sets ``REQUESTER_UID`` (the peer credentials of the ipc socket, or the
daemon's own user for a holder of the TCP fallback's token) in the task that
handles the request, and every task that request starts inherits it. A
segment is used only for the user who owns its file, checked at every use,
not only at the first (the mapping is shared by every request naming it), and
its size is checked at every use too (``collnet.transport.shm``): a segment
truncated under the daemon is refused and unmapped, never touched. The
trainers of one local group (``local_size``) must be one user: their tensors
are resolved in the task of the last one to arrive.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any

import numpy as np
import numpy.typing as npt

from collnet.errors import InvalidArgument
from collnet.transport.shm import SharedBuffer

# The uid of the user whose request is being handled; unset: the daemon's own.
REQUESTER_UID: ContextVar[int | None] = ContextVar("collnet_requester_uid", default=None)


def requester_uid() -> int:
    uid = REQUESTER_UID.get()
    return os.geteuid() if uid is None else uid


class SharedBuffers:
    """Segments mapped by this daemon, by name."""

    def __init__(self) -> None:
        self._mapped: dict[str, SharedBuffer] = {}

    def array(
        self, name: str, dtype: npt.DTypeLike, count: int, offset: int = 0
    ) -> npt.NDArray[Any]:
        """``count`` elements of ``dtype`` at ``offset`` in segment ``name``, for the
        requesting user (see the module docstring)."""
        uid = requester_uid()
        buf = self._mapped.get(name)
        if buf is None:
            buf = self._mapped[name] = SharedBuffer.attach(name, uid)
        dt = np.dtype(dtype)
        if not buf.owner:  # (the daemon's own segments, ``adopt``, need no check)
            self._check(buf, uid, offset + max(count, 0) * dt.itemsize)
        return buf.array(dt, count, offset)

    def _check(self, buf: SharedBuffer, uid: int, end: int) -> None:
        st = buf.stat()
        if st.st_uid != uid:
            raise InvalidArgument(
                f"shared memory {buf.name!r} belongs to uid {st.st_uid}, not to the "
                f"requesting user (uid {uid})"
            )
        if st.st_size < min(end, buf.nbytes):  # (past nbytes: out of range, said below)
            # Its pages past the new end would fault: drop the mapping (views from
            # earlier requests keep theirs alive until they are done).
            self._drop(buf)
            raise InvalidArgument(
                f"shared memory {buf.name!r} holds {st.st_size} bytes, the request needs "
                f"{end} (was it truncated?)"
            )

    def adopt(self, buf: SharedBuffer) -> None:
        """Serve ``buf`` (one the daemon made itself) under its name."""
        self._mapped[buf.name] = buf

    def forget(self, buf: SharedBuffer) -> None:
        """Stop serving ``buf``, one the daemon adopted, and free it."""
        self._drop(buf)

    def _drop(self, buf: SharedBuffer) -> None:
        if self._mapped.get(buf.name) is buf:
            del self._mapped[buf.name]
        buf.close()

    def release(self, name: str) -> None:
        """A trainer is done with ``name``: unmap it, if it is theirs.

        The daemon's own segments (``adopt``) are not a trainer's to release,
        nor is another user's segment (its owner's requests still use it).
        """
        buf = self._mapped.get(name)
        if buf is None or buf.owner or buf.stat().st_uid != requester_uid():
            return
        self._drop(buf)

    def close(self) -> None:
        for buf in self._mapped.values():
            buf.close()
        self._mapped.clear()
