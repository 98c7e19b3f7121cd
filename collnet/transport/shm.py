"""Named shared-memory segments that carry tensor bytes between a trainer and its daemon.

Segments are plain files under /dev/shm mapped with mmap, so the client and
the daemon see the same pages and tensor bytes never cross the IPC socket.
The creator owns (and unlinks) a segment; the daemon only attaches.

/dev/shm is writable by every local user, so what the daemon attaches is
checked, never trusted (``attach``):

- the name matches ``NAME_PATTERN`` (no slash: nothing outside /dev/shm);
- it is opened with ``O_NOFOLLOW``: a ``collnet-*`` symlink to some other
  file is refused, and so is anything that is not a regular file (checked
  with ``fstat`` on the opened descriptor, so no rename can race the check);
- it belongs to the user who asked (the uid the daemon read from the
  request's connection): nobody names another user's tensors;
- its owner and size are asked again (``stat``) before every use, by the
  daemon (collnet_daemon.buffers). A trainer can shrink its file at any
  time, and touching mapped pages past the end of the file is a SIGBUS that
  kills the daemon; a segment found too small is a typed error instead.

What remains: a file truncated *while* a collective is using views of it
(between the check and the last byte moved) still faults. Closing that gap
needs sealed memfds (``F_SEAL_SHRINK``) passed over the socket, which the
local API does not do yet. Every failure path closes the descriptor it opened.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat

import numpy as np
import numpy.typing as npt

from collnet.errors import InvalidArgument

SHM_DIR = "/dev/shm"
NAME_PATTERN = re.compile(r"^collnet-[A-Za-z0-9_.-]{1,64}$")

# No symlinks; never block (a FIFO planted under a collnet- name); not inherited.
_ATTACH_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SharedBuffer:
    """One mapped segment; see the module docstring.

    An attached segment keeps its descriptor open while mapped: it is what
    every later check asks, whatever happens to the name.
    """

    def __init__(self, name: str, fd: int, nbytes: int, owner: bool) -> None:
        self.name = name
        self.nbytes = nbytes
        self.owner = owner
        try:
            # mmap of size 0 is an error; keep a 1-byte map so empty tensors work.
            self._map = mmap.mmap(fd, max(nbytes, 1))
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise InvalidArgument(f"cannot map shared memory {name!r}: {exc}") from None
        # The creator checks nothing and keeps no descriptor (a model's worth of
        # tensors would be as many fds); an attached segment keeps its own.
        self._fd: int | None = None
        if owner:
            os.close(fd)
        else:
            self._fd = fd
        self.closed = False

    @classmethod
    def create(cls, nbytes: int) -> SharedBuffer:
        name = f"collnet-{os.getpid()}-{secrets.token_hex(6)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(os.path.join(SHM_DIR, name), flags, 0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
        except BaseException:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, name))
            raise
        return cls(name, fd, nbytes, owner=True)

    @classmethod
    def attach(cls, name: str, uid: int) -> SharedBuffer:
        """Map the segment ``name`` on behalf of the user ``uid``, who must own it."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise InvalidArgument(f"bad shared memory name {name!r}")
        try:
            fd = os.open(os.path.join(SHM_DIR, name), _ATTACH_FLAGS)
        except OSError as exc:
            reason = "a symlink" if exc.errno == errno.ELOOP else exc.strerror  # O_NOFOLLOW
            raise InvalidArgument(f"cannot open shared memory {name!r}: {reason}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"shared memory {name!r} is not a regular file")
            if st.st_uid != uid:
                raise InvalidArgument(
                    f"shared memory {name!r} belongs to uid {st.st_uid}, not to the "
                    f"requesting user (uid {uid})"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, st.st_size, owner=False)

    def stat(self) -> os.stat_result:
        """The mapped file as it is now (owner, size): an attached segment only."""
        if self.closed or self._fd is None:
            raise InvalidArgument(f"shared memory {self.name} is not attached here")
        return os.fstat(self._fd)

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
        if self._fd is not None:
            os.close(self._fd)
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))
