"""The local API's access rules and the daemon's shared-memory checks, without a daemon.

``LocalAccess`` (who may send requests) and ``SharedBuffers`` (what a request
may name) are driven directly; the security suite (tests/security) replays
the same attacks against real daemons as another user.
"""

from __future__ import annotations

import contextvars
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from collnet_daemon.buffers import REQUESTER_UID, SharedBuffers
from collnet_daemon.localaccess import LocalAccess

from collnet.errors import AuthError, InvalidArgument
from collnet.transport.shm import SHM_DIR, SharedBuffer

ME = os.geteuid()


@pytest.fixture
def planted() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in made:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


def _name(kind: str) -> str:
    return f"collnet-unit-{kind}-{secrets.token_hex(4)}"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_peer_credentials_admit_the_daemons_user_only() -> None:
    access = LocalAccess()
    assert access.check_ipc(b"a", f"localhost:{ME}:0:1234") == ME
    with pytest.raises(AuthError, match=f"uid {ME + 1}"):
        access.check_ipc(b"b", f"localhost:{ME + 1}:{ME + 1}:1234")
    # No credentials from the OS: the socket file's mode is the guard.
    assert access.check_ipc(b"c", "") == ME


def test_a_group_admits_its_members(tmp_path: Path) -> None:
    gid = os.getegid()
    access = LocalAccess(group=str(gid))
    assert access.check_ipc(b"a", f"localhost:{ME + 4242}:{gid}:1") == ME + 4242
    with pytest.raises(AuthError):
        access.check_ipc(b"b", f"localhost:{ME + 4242}:{gid + 4242}:1")


def test_the_token_is_written_private_and_checked_on_every_request(tmp_path: Path) -> None:
    access = LocalAccess(token_file=str(tmp_path / "d.sock.token"))
    access.issue_token()
    path = tmp_path / "d.sock.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_bytes().strip()
    assert access.check_token(b"a", token) == ME
    for bad in (None, b"", token[:-1], b"0" * len(token)):
        with pytest.raises(AuthError):
            access.check_token(b"a", bad)
    assert [p.name for p in tmp_path.iterdir()] == ["d.sock.token"]  # no temporary left
    access.close()
    assert not path.exists()


def test_a_tcp_endpoint_without_a_token_file_is_refused_at_start() -> None:
    with pytest.raises(InvalidArgument, match="token file"):
        LocalAccess().issue_token()


def _in_context(uid: int | None, fn: object) -> object:
    """Run ``fn`` as the request of user ``uid`` would run."""
    ctx = contextvars.copy_context()
    ctx.run(REQUESTER_UID.set, uid)
    return ctx.run(fn)  # type: ignore[arg-type]


def test_attach_refuses_symlinks_odd_files_and_other_users(planted: list[Path]) -> None:
    target = SharedBuffer.create(64)
    try:
        link = Path(SHM_DIR, _name("link"))
        folder = Path(SHM_DIR, _name("dir"))
        fifo = Path(SHM_DIR, _name("fifo"))
        empty = Path(SHM_DIR, _name("empty"))
        planted.extend([link, folder, fifo, empty])
        link.symlink_to(Path(SHM_DIR, target.name))
        folder.mkdir()
        os.mkfifo(fifo)
        empty.touch()
        before = _fds()
        for path, why in [
            (link, "symlink"),
            (folder, "Is a directory"),
            (fifo, "not a regular file"),
            (empty, "cannot map"),
        ]:
            for _ in range(50):
                with pytest.raises(InvalidArgument, match=why):
                    SharedBuffer.attach(path.name, ME)
        with pytest.raises(InvalidArgument, match=f"belongs to uid {ME}"):
            SharedBuffer.attach(target.name, ME + 1)
        for bad in ("../etc/passwd", "collnet-a/b", "other-name"):
            with pytest.raises(InvalidArgument, match="bad shared memory name"):
                SharedBuffer.attach(bad, ME)
        assert _fds() == before
    finally:
        target.close()


def test_every_use_checks_the_owner_and_the_size() -> None:
    seg = SharedBuffer.create(4096)
    buffers = SharedBuffers()
    try:
        arr = _in_context(ME, lambda: buffers.array(seg.name, np.float32, 1024))
        assert isinstance(arr, np.ndarray) and arr.size == 1024
        # Mapped once; another user naming it later is refused all the same.
        with pytest.raises(InvalidArgument, match="belongs to uid"):
            _in_context(ME + 1, lambda: buffers.array(seg.name, np.float32, 1024))
        # ...and cannot release it from under its owner.
        _in_context(ME + 1, lambda: buffers.release(seg.name))
        assert seg.name in buffers._mapped
        # Truncated: refused and unmapped, never touched.
        os.truncate(Path(SHM_DIR, seg.name), 1024)
        with pytest.raises(InvalidArgument, match="truncated"):
            _in_context(ME, lambda: buffers.array(seg.name, np.float32, 1024))
        assert seg.name not in buffers._mapped
        # What is left is still usable (mapped again at its new size).
        part = _in_context(ME, lambda: buffers.array(seg.name, np.float32, 256))
        assert isinstance(part, np.ndarray) and part.size == 256
        # A range past the segment is out of range, not "truncated".
        with pytest.raises(InvalidArgument, match="outside"):
            _in_context(ME, lambda: buffers.array(seg.name, np.float32, 2048))
    finally:
        buffers.close()
        seg.close()
