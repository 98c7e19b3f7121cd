"""The daemon's local API on a shared machine: another user gets nothing (issue 10, part 2).

Each test replays a finding against a real daemon, the attacker being
another unprivileged local user (``other_user``, see conftest.py) where
that matters:

- the ipc socket is 0600 whatever the umask, and a request from another
  uid is refused even where the file mode was loosened;
- the loopback TCP fallback is off by default, and on only with a token
  that only the daemon's user can read; ``leave`` from anyone else does
  nothing;
- shared memory is attached only when the requester owns it, never through
  a symlink, and is sized at every use: a truncated segment is a typed
  error, the daemon lives on; failed attaches leak no descriptor.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import collnet_client
import msgpack
import numpy as np
import pytest
import zmq
from cluster_harness import (
    Peers,
    run_on_all,
    run_on_all_outcomes,
    start_peers,
    stop_peers,
    tcp_listen_ports,
)
from collnet_client import Comm
from otheruser import OtherUser

from collnet.errors import AuthError, CollnetError, InvalidArgument

pytestmark = pytest.mark.timeout(120)


# -- helpers -----------------------------------------------------------------


@contextlib.contextmanager
def _cluster(
    workdir: Path, *args: str, umask: int | None = None, peers: int = 1
) -> Iterator[Peers]:
    """Admitted daemons with ``args``; started under ``umask`` if given."""
    old = None if umask is None else os.umask(umask)
    try:
        started = start_peers(peers, workdir, extra_args=list(args))
    finally:
        if old is not None:
            os.umask(old)
    try:
        yield started
    finally:
        stop_peers(started)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _path(ipc: str) -> Path:
    return Path(ipc.removeprefix("ipc://"))


def _all_reduce(shm: str, count: int, tag: str) -> dict[str, Any]:
    return {"op": "all_reduce", "shm": shm, "count": count, "dtype": "float32", "tag": tag}


def _ask(address: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request as the daemon's own user, on a raw DEALER socket."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(msgpack.packb({"id": 9, **request}, use_bin_type=True))
        assert sock.poll(10_000, zmq.POLLIN), "the daemon did not answer"
        reply = msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(0)
    assert isinstance(reply, dict)
    return reply


def _refused(reply: Any, kind: str, *words: str) -> None:
    assert isinstance(reply, dict) and reply.get("ok") is False, reply
    assert reply["error"]["kind"] == kind, reply
    for word in words:
        assert word in reply["error"]["message"], reply


def _still_serving(p: Peers) -> None:
    """Every daemon lives, is still a member, and all-reduces."""
    for daemon in p.cluster.daemons:
        assert daemon.proc.poll() is None, f"daemon {daemon.peer_id} died"
        assert daemon.peer_id in p.comms[0].world.peers
    tag = f"alive-{secrets.token_hex(3)}"

    def one(rank: int, comm: Comm) -> np.ndarray:
        arr = comm.empty(64, np.float32)
        arr[:] = 3.0
        return np.array(comm.all_reduce(arr, tag=tag, timeout_s=30))

    for out in run_on_all(p.comms, one):
        assert np.array_equal(out, np.full(64, 3.0 * p.size))


def _log(p: Peers) -> str:
    return (p.cluster.dir / "daemon0.log").read_text(errors="replace")


def _clean_log(p: Peers) -> None:
    log = _log(p)
    assert "Traceback" not in log and "internal daemon error" not in log, log[-3000:]


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def _shm_entries() -> Iterator[list[Path]]:
    """/dev/shm entries a test plants; removed afterwards, whatever they are."""
    made: list[Path] = []
    try:
        yield made
    finally:
        for path in made:
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()


@pytest.fixture
def root_secret() -> Iterator[Path]:
    """A file only root can read (in a 0700 directory), 64 bytes."""
    d = Path(tempfile.mkdtemp(prefix="collnet-secret-"))
    secret = d / "secret"
    secret.write_bytes(b"TOP SECRET " * 6 + b"...")
    secret.chmod(0o600)
    yield secret
    secret.unlink()
    d.rmdir()


# -- the ipc socket ----------------------------------------------------------


def test_ipc_socket_is_private_to_the_daemons_user_whatever_the_umask(
    other_user: OtherUser, workdir: Path
) -> None:
    with _cluster(workdir, umask=0) as p:
        sock = _path(p.cluster.daemons[0].ipc)
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.geteuid()
        assert other_user.probe({"do": "connect_unix", "path": str(sock)}) == ["PermissionError"]

        # Someone loosened the file: the peer credentials still keep the other user out.
        os.chmod(sock, 0o666)
        address = p.cluster.daemons[0].ipc
        hello, leave = other_user.probe(
            {"do": "ask", "address": address, "request": {"op": "hello"}},
            {"do": "ask", "address": address, "request": {"op": "leave"}},
        )
        _refused(hello, "AuthError", f"uid {other_user.uid}")
        _refused(leave, "AuthError")
        time.sleep(0.5)
        _still_serving(p)
        assert f"refused uid {other_user.uid}" in _log(p)
        _clean_log(p)


# -- the TCP fallback --------------------------------------------------------


def test_tcp_fallback_is_off_by_default(other_user: OtherUser, workdir: Path) -> None:
    with _cluster(workdir) as p:
        daemon = p.cluster.daemons[0]
        data_port = int(daemon.data.rsplit(":", 1)[1])
        # Only the data port: no loopback endpoint for the local API.
        assert tcp_listen_ports(daemon.proc.pid) == {data_port}
        assert not Path(str(_path(daemon.ipc)) + ".token").exists()


def test_tcp_fallback_needs_the_token_only_the_daemons_user_can_read(
    other_user: OtherUser, workdir: Path
) -> None:
    port = _free_port()
    with _cluster(workdir, "--ipc-tcp-port", str(port)) as p:
        daemon = p.cluster.daemons[0]
        assert port in tcp_listen_ports(daemon.proc.pid)
        token_file = Path(str(_path(daemon.ipc)) + ".token")
        st = os.stat(token_file)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        token = token_file.read_text().strip()
        assert len(token) == 64

        tcp = f"tcp://127.0.0.1:{port}"
        hello = {"op": "hello"}
        read, bare, wrong, short = other_user.probe(
            {"do": "read", "path": str(token_file)},
            {"do": "ask", "address": tcp, "request": hello},
            {"do": "ask", "address": tcp, "request": hello, "token": "0" * 64},
            {"do": "ask", "address": tcp, "request": hello, "token": token[:-1]},
        )
        assert read == "PermissionError"
        _refused(bare, "AuthError", "no token")
        _refused(wrong, "AuthError", "wrong token")
        _refused(short, "AuthError", "wrong token")

        # The token's holder (the daemon's own user) is served, every request of it.
        with collnet_client.connect(tcp, timeout_s=30, token_file=str(token_file)) as comm:
            assert comm.peer_id == daemon.peer_id
            out = comm.all_reduce(np.arange(8, dtype=np.float32), tag="tok-1", timeout_s=30)
            assert np.array_equal(out, np.arange(8, dtype=np.float32))
        with pytest.raises(AuthError, match="cannot read"):
            collnet_client.connect(tcp, timeout_s=10, token_file=str(workdir / "absent"))
        _still_serving(p)
        assert "with no token" in _log(p)
        _clean_log(p)


def test_leave_from_another_user_does_nothing(other_user: OtherUser, workdir: Path) -> None:
    port = _free_port()
    with _cluster(workdir, "--ipc-tcp-port", str(port), umask=0) as p:
        daemon = p.cluster.daemons[0]
        tcp = f"tcp://127.0.0.1:{port}"
        leave = {"op": "leave"}
        by_ipc, by_tcp, by_tcp_guess = other_user.probe(
            {"do": "connect_unix", "path": str(_path(daemon.ipc))},
            {"do": "ask", "address": tcp, "request": leave},
            {"do": "ask", "address": tcp, "request": leave, "token": secrets.token_hex(32)},
        )
        assert by_ipc == "PermissionError"
        _refused(by_tcp, "AuthError")
        _refused(by_tcp_guess, "AuthError")
        time.sleep(1.0)  # a leave would have stopped it by now
        _still_serving(p)
        assert p.comms[0].update_topology(timeout_s=30).size == 1


# -- shared memory -----------------------------------------------------------


def test_group_members_use_their_own_memory_and_never_anothers(
    other_user: OtherUser, workdir: Path
) -> None:
    group = grp.getgrgid(other_user.gid).gr_name
    with _cluster(workdir, "--ipc-group", group, umask=0) as p:
        daemon = p.cluster.daemons[0]
        st = os.stat(_path(daemon.ipc))
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == other_user.gid

        comm = p.comms[0]
        victim = comm.empty(8, np.float32)
        victim[:] = 7.0
        comm.all_reduce(victim, tag="v-1", timeout_s=30)  # the daemon maps it now
        victim_seg = comm.memory.locate(victim)[0].name  # type: ignore[index]
        assert victim_seg in Path(f"/proc/{daemon.proc.pid}/maps").read_text()

        own = f"collnet-probe-{secrets.token_hex(4)}"
        with _shm_entries() as made:
            made.append(Path("/dev/shm", own))
            ask = {"do": "ask", "address": daemon.ipc}
            results = other_user.probe(
                {**ask, "request": {"op": "hello"}},
                {"do": "make_shm", "name": own, "values": [1.0] * 8},
                {**ask, "request": _all_reduce(own, 8, "g-1")},
                {**ask, "request": _all_reduce(victim_seg, 8, "g-2")},
                {**ask, "request": {"op": "release", "shm": victim_seg}},
                {"do": "read_shm", "name": own, "count": 8},
            )
        hello, made_ok, own_reduce, stolen, release, own_values = results
        assert hello["ok"] is True, hello
        assert made_ok == "ok"
        assert own_reduce["ok"] is True, own_reduce  # its own segment: served
        assert own_values == [1.0] * 8
        _refused(stolen, "InvalidArgument", f"belongs to uid {os.geteuid()}")
        # A release of someone else's segment does not unmap it from under them.
        assert release["ok"] is True
        assert victim_seg in Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        assert np.array_equal(victim, np.full(8, 7.0, np.float32))
        assert np.array_equal(comm.all_reduce(victim, tag="v-2", timeout_s=30), np.full(8, 7.0))
        del victim
        _clean_log(p)


def test_symlinks_in_dev_shm_are_refused(
    other_user: OtherUser, workdir: Path, root_secret: Path
) -> None:
    before = root_secret.read_bytes()
    group = grp.getgrgid(other_user.gid).gr_name
    with _cluster(workdir, "--ipc-group", group) as p, _shm_entries() as made:
        daemon = p.cluster.daemons[0]
        # The daemon's own user's link (the kernel would let the daemon follow it).
        mine = f"collnet-link-{secrets.token_hex(4)}"
        made.append(Path("/dev/shm", mine))
        os.symlink(root_secret, f"/dev/shm/{mine}")
        _refused(_ask(daemon.ipc, _all_reduce(mine, 4, "l-1")), "InvalidArgument", "symlink")
        # Another user's link, planted in the world-writable /dev/shm.
        theirs = f"collnet-probe-link-{secrets.token_hex(4)}"
        made.append(Path("/dev/shm", theirs))
        planted, reply = other_user.probe(
            {"do": "symlink", "name": theirs, "target": str(root_secret)},
            {"do": "ask", "address": daemon.ipc, "request": _all_reduce(theirs, 4, "l-2")},
        )
        assert planted == "ok"
        _refused(reply, "InvalidArgument", "symlink")
        assert root_secret.read_bytes() == before
        assert str(root_secret) not in Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        _still_serving(p)
        _clean_log(p)


def test_a_truncated_segment_is_a_typed_error_and_the_daemon_lives_on(workdir: Path) -> None:
    # Two peers, so that the ring really reads and writes the tensor's pages.
    with _cluster(workdir, peers=2) as p:
        daemon = p.cluster.daemons[0]
        big = [comm.empty(1 << 18, np.float32) for comm in p.comms]
        for arr in big:
            arr[:] = 1.0
        run_on_all(p.comms, lambda r, c: c.all_reduce(big[r], tag="t-1", timeout_s=30))
        name = p.comms[0].memory.locate(big[0])[0].name  # type: ignore[index]
        os.truncate(f"/dev/shm/{name}", 0)  # (this process must not touch big[0] again)
        outcomes = run_on_all_outcomes(
            p.comms, lambda r, c: c.all_reduce(big[r], tag="t-2", timeout_s=30)
        )
        assert isinstance(outcomes[0], InvalidArgument), outcomes
        assert "truncated" in str(outcomes[0])
        # The other peer is told at once (not at its deadline), with a typed error.
        assert isinstance(outcomes[1], CollnetError), outcomes
        assert daemon.proc.poll() is None, "the daemon died (SIGBUS?)"
        # The refused mapping was dropped, not kept to fault later.
        assert name not in Path(f"/proc/{daemon.proc.pid}/maps").read_text()

        # Shrunk to half: the half that is left is still usable, the rest is refused.
        half = [comm.empty(1024, np.float32) for comm in p.comms]
        for arr in half:
            arr[:] = 2.0
        run_on_all(p.comms, lambda r, c: c.all_reduce(half[r], tag="t-3", timeout_s=30))
        seg = p.comms[0].memory.locate(half[0])[0].name  # type: ignore[index]
        os.truncate(f"/dev/shm/{seg}", 2048)
        outcomes = run_on_all_outcomes(
            p.comms, lambda r, c: c.all_reduce(half[r], tag="t-4", timeout_s=30)
        )
        assert isinstance(outcomes[0], InvalidArgument) and "truncated" in str(outcomes[0])
        half[0][:512] = 4.0  # (what is left of peer 0's file) and the other peer's,
        half[1][:] = 4.0  # whatever its aborted collective left there
        out = run_on_all(
            p.comms, lambda r, c: np.array(c.all_reduce(half[r][:512], tag="t-5", timeout_s=30))
        )
        assert all(np.array_equal(o, np.full(512, 8.0, np.float32)) for o in out), out
        _still_serving(p)
        _clean_log(p)


def test_bad_attach_requests_leak_no_descriptors(other_user: OtherUser, workdir: Path) -> None:
    with _cluster(workdir) as p, _shm_entries() as made:
        daemon = p.cluster.daemons[0]
        stem = f"collnet-bad-{secrets.token_hex(3)}"
        empty, folder, fifo, link, foreign = (
            Path("/dev/shm", f"{stem}-{kind}") for kind in ("empty", "dir", "fifo", "link", "other")
        )
        made.extend([empty, folder, fifo, link, foreign])
        empty.touch(mode=0o600)  # mmap of an empty file fails
        folder.mkdir()
        os.mkfifo(fifo, 0o600)
        os.symlink("/etc/hostname", link)
        foreign.write_bytes(b"\0" * 64)
        os.chown(foreign, other_user.uid, other_user.gid)
        names = [entry.name for entry in made] + [f"{stem}-missing"]

        comm = p.comms[0]
        comm.all_reduce(np.ones(4, np.float32), tag="warm", timeout_s=30)
        before = _fd_count(daemon.proc.pid)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.ipc)
        try:
            for i in range(400):
                req = _all_reduce(names[i % len(names)], 4, f"bad-{i}")
                sock.send(msgpack.packb({"id": i, **req}, use_bin_type=True))
                assert sock.poll(10_000, zmq.POLLIN), f"no answer to bad request {i}"
                reply = msgpack.unpackb(sock.recv(), raw=False)
                _refused(reply, "InvalidArgument")
        finally:
            sock.close(0)
        after = _fd_count(daemon.proc.pid)
        assert after <= before + 2, f"{before} -> {after} descriptors after 400 bad requests"
        _still_serving(p)
        _clean_log(p)
