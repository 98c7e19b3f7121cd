"""Named shared-memory segments that carry tensor bytes between a trainer and its daemon.

Segments are plain files under /dev/shm mapped with mmap, so the client and
the daemon see the same pages and tensor bytes never cross the IPC socket.
The creator owns (and unlinks) a segment; the daemon only attaches, and only
to names that match ``NAME_PATTERN``, so a client cannot make the daemon open
an arbitrary file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets

import numpy as np
import numpy.typing as npt

from collnet.errors import InvalidArgument

SHM_DIR = "/dev/shm"
NAME_PATTERN = re.compile(r"^collnet-[A-Za-z0-9_.-]{1,64}$")


class SharedBuffer:
    """One mapped segment; see the module docstring."""

    def __init__(self, name: str, fd: int, nbytes: int, owner: bool) -> None:
        self.name = name
        self.nbytes = nbytes
        self.owner = owner
        # mmap of size 0 is an error; keep a 1-byte map so empty tensors work.
        self._map = mmap.mmap(fd, max(nbytes, 1))
        os.close(fd)
        self.closed = False

    @classmethod
    def create(cls, nbytes: int) -> SharedBuffer:
        name = f"collnet-{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, max(nbytes, 1))
        return cls(name, fd, nbytes, owner=True)

    @classmethod
    def attach(cls, name: str) -> SharedBuffer:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise InvalidArgument(f"bad shared memory name {name!r}")
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except OSError as exc:
            raise InvalidArgument(f"cannot open shared memory {name!r}: {exc}") from None
        nbytes = os.fstat(fd).st_size
        return cls(name, fd, nbytes, owner=False)

    def array(self, dtype: npt.DTypeLike, count: int, offset: int = 0) -> npt.NDArray[np.generic]:
        dt = np.dtype(dtype)
        end = offset + count * dt.itemsize
        if offset < 0 or count < 0 or end > self.nbytes:
            raise InvalidArgument(
                f"range [{offset}, {end}) outside shared memory {self.name} of {self.nbytes} bytes"
            )
        return np.frombuffer(self._map, dtype=dt, count=count, offset=offset)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # BufferError: numpy views still reference the map; it is freed with them.
        with contextlib.suppress(BufferError):
            self._map.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))
