"""Driving a real cluster from the test process: one Comm and one thread per peer.

A ``Peers`` owns a ``LocalCluster`` (a coordinator and N daemon processes on
loopback) and a ``collnet_client.Comm`` to each daemon. Client calls block,
so every collective is issued from one thread per peer at once
(``run_on_all``); each call carries a timeout, so a hang surfaces as a typed
``Timeout`` in the test rather than as a stuck worker.

Tags: a collective is keyed by ``(epoch, tag)``, and a tag must never be
reused within an epoch, so tests take a fresh one from ``fresh_tag()`` for
every collective and pass the same one to every peer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import collnet_client
import ml_dtypes
import numpy as np
from collnet_client import Comm, World
from collnet_lab.localcluster import LocalCluster

from collnet.wire import FrameKind, FrameReader, frame_bytes

T = TypeVar("T")

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)
INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
DTYPES = FLOAT_DTYPES + INT_DTYPES

# Every client call in these tests is bounded by this, so nothing waits forever.
CALL_TIMEOUT_S = 60.0

_tags = itertools.count(1)

# Clusters currently running, so a failing test can show their logs.
LIVE_CLUSTERS: list[LocalCluster] = []


def fresh_tag(prefix: str = "t") -> str:
    """A collective tag never used before in this test session."""
    return f"{prefix}{next(_tags)}"


def run_on_all(
    comms: Sequence[Comm], fn: Callable[[int, Comm], T], timeout_s: float = CALL_TIMEOUT_S
) -> list[T]:
    """Run ``fn(rank, comm)`` for every peer at once; return the results in rank order.

    The first exception (in rank order) is re-raised after every peer finished.
    """
    outcomes = run_on_all_outcomes(comms, fn, timeout_s)
    for out in outcomes:
        if isinstance(out, BaseException):
            raise out
    return outcomes  # type: ignore[return-value]


def run_on_all_outcomes(
    comms: Sequence[Comm], fn: Callable[[int, Comm], T], timeout_s: float = CALL_TIMEOUT_S
) -> list[T | BaseException]:
    """Like ``run_on_all`` but returns each peer's exception in place of its result."""
    with ThreadPoolExecutor(max_workers=max(1, len(comms))) as pool:
        futures = [pool.submit(fn, rank, comm) for rank, comm in enumerate(comms)]
        outcomes: list[T | BaseException] = []
        for fut in futures:
            try:
                outcomes.append(fut.result(timeout=timeout_s))
            except BaseException as exc:
                outcomes.append(exc)
        return outcomes


@dataclass
class Peers:
    """A running cluster and one client connection per daemon, in daemon order."""

    cluster: LocalCluster
    comms: list[Comm] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.comms)

    def connect(self, index: int) -> Comm:
        return collnet_client.connect(self.cluster.daemons[index].ipc, timeout_s=CALL_TIMEOUT_S)

    def sync_world(self, comms: Sequence[Comm] | None = None) -> list[World]:
        """Every peer calls ``update_topology`` at once (admits pending peers)."""
        return run_on_all(
            self.comms if comms is None else comms,
            lambda _r, c: c.update_topology(timeout_s=CALL_TIMEOUT_S),
        )

    def all_reduce(
        self,
        inputs: Sequence[np.ndarray],
        *,
        zero_copy: bool = False,
        tag: str | None = None,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """All-reduce ``inputs[rank]`` on every peer; return copies of each peer's result.

        ``zero_copy``: the tensors live in the peers' shared memory
        (``Comm.empty``) rather than in plain arrays that get staged.
        """
        assert len(inputs) == self.size
        tag = fresh_tag() if tag is None else tag

        def one(rank: int, comm: Comm) -> np.ndarray:
            src = inputs[rank]
            if zero_copy:
                buf = comm.empty(src.shape, src.dtype)
                np.copyto(buf, src)
            else:
                buf = src.copy()
            out = comm.all_reduce(buf, tag=tag, timeout_s=CALL_TIMEOUT_S, **kwargs)
            assert out is buf, "all_reduce must return the tensor it reduced in place"
            return np.array(out, copy=True)

        return run_on_all(self.comms, one)

    def close(self) -> None:
        for comm in self.comms:
            comm.close()
        self.comms.clear()


def start_peers(
    n: int,
    workdir: Path,
    connections: int = 2,
    extra_args: Sequence[str] = (),
    admit: bool = True,
    secret_file: Path | None = None,
    coordinator_args: Sequence[str] = (),
) -> Peers:
    """Start a coordinator and ``n`` daemons; connect to each; admit them all if ``admit``."""
    cluster = LocalCluster(
        peers=n,
        connections=connections,
        extra_args=list(extra_args),
        coordinator_args=list(coordinator_args),
        workdir=workdir,
        secret_file=secret_file,
    )
    LIVE_CLUSTERS.append(cluster)
    peers = Peers(cluster)
    try:
        cluster.start()
        peers.comms = [peers.connect(i) for i in range(n)]
        if admit:
            worlds = peers.sync_world()
            assert {w.size for w in worlds} == {n}, worlds
    except BaseException:
        stop_peers(peers)
        raise
    return peers


def stop_peers(peers: Peers) -> None:
    """Close the clients, stop every process of the cluster and check none is left."""
    peers.close()
    cluster = peers.cluster
    try:
        cluster.stop()
    finally:
        with contextlib.suppress(ValueError):
            LIVE_CLUSTERS.remove(cluster)
    procs = [d.proc for d in cluster.daemons]
    if cluster.coordinator is not None:
        procs.append(cluster.coordinator)
    alive = [p.pid for p in procs if p.poll() is None]
    for pid in alive:  # stop() escalates to SIGKILL, so this is belt and braces
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"cluster processes survived stop(): {alive}"


@contextlib.contextmanager
def running_peers(n: int, workdir: Path, **kwargs: Any) -> Iterator[Peers]:
    peers = start_peers(n, workdir, **kwargs)
    try:
        yield peers
    finally:
        stop_peers(peers)


# -- inputs and references ---------------------------------------------------


def peer_inputs(world: int, n: int, dtype: np.dtype[Any], op: str, seed: int) -> list[np.ndarray]:
    """Deterministic per-peer inputs for which ``op`` is well conditioned in ``dtype``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(world):
        if dtype in INT_DTYPES:
            lo, hi = (-3, 4) if op == "prod" else (-1000, 1001)
            out.append(rng.integers(lo, hi, n).astype(dtype))
        elif op == "prod":
            out.append(rng.uniform(0.5, 1.5, n).astype(dtype))
        else:
            out.append(rng.uniform(-1.0, 1.0, n).astype(dtype))
    return out


def reference(inputs: Sequence[np.ndarray], op: str) -> np.ndarray:
    """``op`` over the peers' inputs, exact for ints, in float64 for floats."""
    exact = inputs[0].dtype in INT_DTYPES
    stack = np.stack([x if exact else x.astype(np.float64) for x in inputs])
    if op in ("sum", "avg"):
        res = stack.sum(axis=0, dtype=stack.dtype)
        return res / len(inputs) if op == "avg" else res
    if op == "prod":
        return stack.prod(axis=0, dtype=stack.dtype)
    return stack.min(axis=0) if op == "min" else stack.max(axis=0)


def float_tolerance(dtype: np.dtype[Any], op: str, world: int) -> tuple[float, float]:
    """(atol, rtol) for a ``world``-peer reduction rounded in ``dtype`` after every combine.

    Inputs are in [-1, 1) (prod: [0.5, 1.5)): each of the ``world - 1`` combines
    rounds a partial of magnitude at most ``world`` by half an ulp.
    """
    eps = float(ml_dtypes.finfo(dtype).eps)
    if op in ("min", "max"):
        return 0.0, 0.0
    if op == "prod":
        return 0.0, 2.0 * world * eps
    return world * world * eps, 0.0


def assert_bit_identical(results: Sequence[np.ndarray], where: str = "") -> None:
    first = results[0].tobytes()
    for rank, res in enumerate(results[1:], start=1):
        assert res.tobytes() == first, f"{where} rank {rank}'s result differs from rank 0's"


def assert_matches_reference(
    results: Sequence[np.ndarray], inputs: Sequence[np.ndarray], op: str, where: str = ""
) -> None:
    """Every peer's result equals the reference (exactly for ints and min/max).

    ``where`` prefixes failure messages (say, which size was being reduced).
    """
    ref = reference(inputs, op)
    dtype = inputs[0].dtype
    for rank, res in enumerate(results):
        assert res.dtype == dtype and res.shape == inputs[0].shape, f"{where} rank {rank}"
        if dtype in INT_DTYPES:
            np.testing.assert_array_equal(res, ref, err_msg=f"{where} rank {rank}")
            continue
        atol, rtol = float_tolerance(dtype, op, len(inputs))
        # min/max pick one of the inputs: exact even in float16/bfloat16.
        np.testing.assert_allclose(
            res.astype(np.float64), ref, atol=atol, rtol=rtol, err_msg=f"{where} rank {rank}"
        )


# -- raw sockets ---------------------------------------------------------------


def hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def handshake_as(addr: str, peer_id: str, conn: int = 0, k: int = 2) -> socket.socket:
    """A connection to data port ``addr`` that completed the HELLO handshake as
    ``peer_id`` (connection ``conn`` of ``k``): with no secret, any loopback
    process can be such a peer."""
    sock = socket.create_connection(hostport(addr), timeout=10)
    sock.sendall(frame_bytes(FrameKind.HELLO, {"peer": peer_id, "conn": conn, "k": k}))
    reader = FrameReader()
    while not (frames := reader.feed(sock.recv(4096))):
        pass
    assert frames[0].kind == FrameKind.HELLO
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything ``sock`` receives until the far side closes (EOF or reset).

    Fails the test if the far side keeps the connection open past ``timeout_s``.
    """
    sock.settimeout(timeout_s)
    got = bytearray()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(got)
        except TimeoutError:
            break
        if not data:
            return bytes(got)
        got += data
    raise AssertionError(f"connection still open after {timeout_s}s (received {bytes(got)!r:.80})")


def log_size(path: Path) -> int:
    """Where new lines of log ``path`` will start (pass to ``wait_for_log``)."""
    return path.stat().st_size if path.exists() else 0


def wait_for_log(
    path: Path, needles: Sequence[str], since: int = 0, timeout_s: float = 10.0
) -> str:
    """The text of log ``path`` after byte ``since``, once it mentions every one of ``needles``."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        if path.exists():
            with path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        if all(n in text for n in needles):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{path.name} never mentioned {list(needles)}; it holds:\n{text[-3000:]}")


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``pred`` until true; return the seconds it took."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.05)
    return time.monotonic() - start


def status_json(coordinator: str) -> dict[str, Any]:
    """``collnet status --coordinator COORDINATOR --json``, run as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "collnet_daemon", "status", "--coordinator", coordinator, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    status: dict[str, Any] = json.loads(proc.stdout)
    return status


def run_example_json(example: Path, *args: str, timeout_s: float = 200) -> dict[str, Any]:
    """Run ``example --json ARGS`` as a user runs it; the JSON its last stdout line holds.

    Fails with the tail of its stderr if it printed nothing or exited non-zero.
    """
    proc = subprocess.run(
        [sys.executable, str(example), "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, (out, proc.stderr[-3000:])
    return out


def tcp_listen_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets, in its network namespace)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports
