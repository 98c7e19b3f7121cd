"""The thin client: a trainer process talking to its node's daemon.

Control messages are msgpack over a pyzmq DEALER socket; tensor bytes stay in
shared memory that both processes map. Arrays allocated with
``Comm.empty``/``Comm.zeros`` live in shared memory already and are reduced in
place with no copy; any other numpy array is copied into a staging segment
and back (one copy each way).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import zmq

from collnet.algo.ops import DTYPE_BY_NAME
from collnet.errors import CollnetError, DaemonUnavailable, InvalidArgument, Timeout
from collnet.transport.shm import SharedBuffer

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """The world as the daemon last saw it."""

    epoch: int
    peers: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.peers)

    @staticmethod
    def from_wire(obj: dict[str, Any]) -> World:
        return World(
            int(obj["epoch"]),
            tuple(str(p[0]) for p in obj.get("peers", [])),
            tuple(str(p) for p in obj.get("pending", [])),
        )


@dataclass(frozen=True)
class SyncResult:
    """What ``Comm.sync_state`` did, and whether every peer now holds the same state."""

    revision: int  # the revision this peer holds now
    fetched: tuple[str, ...]  # tensors overwritten with the reference's bytes
    sources: tuple[str, ...]  # peers they were fetched from
    bytes_fetched: int
    in_parity: bool  # every member reported the same revision and state digest
    state_digest: str  # digest of the whole state (names and tensor digests)
    peers: int  # members that took part

    @staticmethod
    def from_wire(obj: dict[str, Any]) -> SyncResult:
        return SyncResult(
            int(obj["revision"]),
            tuple(obj["fetched"]),
            tuple(obj["sources"]),
            int(obj["bytes_fetched"]),
            bool(obj["in_parity"]),
            str(obj["state_digest"]),
            int(obj["peers"]),
        )


class Handle:
    """An all-reduce in flight; ``wait()`` returns the reduced array."""

    def __init__(
        self,
        comm: Comm,
        rid: int,
        result: npt.NDArray[Any],
        staging: tuple[SharedBuffer, npt.NDArray[Any]] | None,
    ) -> None:
        self._comm = comm
        self._rid = rid
        self._result = result
        self._staging = staging
        self._done = False

    def done(self) -> bool:
        if not self._done:
            self._done = self._comm._poll_reply(self._rid)
        return self._done

    def wait(self, timeout_s: float | None = None) -> npt.NDArray[Any]:
        staging, self._staging = self._staging, None
        try:
            try:
                self._comm._wait_reply(self._rid, timeout_s)
            except CollnetError as exc:
                # A staged tensor is only written back on success: it still holds
                # the caller's input, so a retry is correct as it stands.
                if staging is not None:
                    exc.fields["buffer_modified"] = False
                raise
            if staging is not None:
                view = staging[1][: self._result.nbytes].view(self._result.dtype)
                np.copyto(self._result, view.reshape(self._result.shape))
        finally:
            self._done = True
            if staging is not None:
                self._comm._staging.append(staging)
        return self._result


class Comm:
    """A connection to the local daemon; see the module docstring."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self.timeout_s = timeout_s
        path = address.removeprefix("ipc://")
        if path != address and not path.startswith("@") and not os.path.exists(path):
            # zmq would wait for the socket to appear: fail now, not after the hello timeout.
            raise DaemonUnavailable(f"no daemon listens at {address} ({path} does not exist)")
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._tags = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        # id(base ndarray) -> (its segment, that ndarray). Holding the ndarray keeps
        # its id from being reused by an unrelated array once the caller drops it;
        # a reused id would send a plain array's all-reduce to a stale segment.
        self._segments: dict[int, tuple[SharedBuffer, npt.NDArray[Any]]] = {}
        self._staging: list[tuple[SharedBuffer, npt.NDArray[Any]]] = []
        self.closed = False
        try:
            hello = self._call("hello", timeout_s=min(timeout_s, 10.0))
        except Timeout:
            self.close()
            raise DaemonUnavailable(f"no daemon answers at {address}") from None
        self.peer_id: str = hello["peer"]
        # The epoch this trainer agreed to: set by update_topology (and at
        # connect), never by a mere look at the world. Collectives run in it, so
        # a world that shrank under the trainer fails them instead of silently
        # moving some peers to a new epoch and not others.
        self._world = World.from_wire(hello["world"])
        self.epoch = self._world.epoch

    # -- membership --------------------------------------------------------
    @property
    def world(self) -> World:
        return World.from_wire(self._call("world")["world"])

    def update_topology(self, timeout_s: float | None = None) -> World:
        self._world = World.from_wire(self._call("update_topology", timeout_s=timeout_s)["world"])
        self.epoch = self._world.epoch
        return self._world

    # -- memory ------------------------------------------------------------
    def empty(
        self, shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float32
    ) -> npt.NDArray[Any]:
        """An array in shared memory: all-reduces on it cost no copy."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape))
        seg = SharedBuffer.create(n * dt.itemsize)
        base = seg.array(dt, n)
        self._segments[id(base)] = (seg, base)
        return base.reshape(shape)

    def zeros(
        self, shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float32
    ) -> npt.NDArray[Any]:
        arr = self.empty(shape, dtype)
        arr.fill(0)
        return arr

    def _locate(self, arr: npt.NDArray[Any]) -> tuple[SharedBuffer, int] | None:
        base = arr
        while isinstance(base.base, np.ndarray):
            base = base.base
        entry = self._segments.get(id(base))
        if entry is None or entry[1] is not base or not arr.flags.c_contiguous:
            return None
        seg = entry[0]
        offset = arr.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        return seg, offset

    def _stage(self, nbytes: int) -> tuple[SharedBuffer, npt.NDArray[Any]]:
        for i, (seg, _) in enumerate(self._staging):
            if seg.nbytes >= nbytes:
                return self._staging.pop(i)
        seg = SharedBuffer.create(nbytes)
        return seg, seg.array(np.uint8, nbytes)

    # -- collectives -------------------------------------------------------
    def all_reduce(
        self,
        tensor: npt.NDArray[Any],
        op: str = "sum",
        codec: str = "none",
        algo: str = "auto",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> npt.NDArray[Any]:
        """Reduce ``tensor`` across the world, in place; returns it."""
        return self.all_reduce_async(tensor, op, codec, algo, tag, timeout_s).wait()

    def all_reduce_async(
        self,
        tensor: npt.NDArray[Any],
        op: str = "sum",
        codec: str = "none",
        algo: str = "auto",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Handle:
        dtype_name = tensor.dtype.name
        if DTYPE_BY_NAME.get(dtype_name) != tensor.dtype:
            raise InvalidArgument(
                f"unsupported dtype {tensor.dtype}; use one of {list(DTYPE_BY_NAME)}"
            )
        where = self._locate(tensor)
        staging = None
        if where is None:
            staging = self._stage(tensor.nbytes)
            np.copyto(staging[1][: tensor.nbytes].view(tensor.dtype), tensor.reshape(-1))
            where = (staging[0], 0)
        seg, offset = where
        rid = self._send(
            "all_reduce",
            shm=seg.name,
            offset=offset,
            count=int(tensor.size),
            dtype=dtype_name,
            reduce=op,
            codec=codec,
            algo=algo,
            tag=next(self._tags) if tag is None else tag,
            epoch=self.epoch,
            timeout_s=timeout_s,
        )
        return Handle(self, rid, tensor, staging)

    # -- shared state ------------------------------------------------------
    def sync_state(
        self,
        named_tensors: Mapping[str, npt.NDArray[Any]],
        revision: int,
        timeout_s: float | None = None,
    ) -> SyncResult:
        """Bring ``named_tensors`` to the world's shared state, in place (a barrier).

        Every member calls it with the same names, dtypes and shapes. Per
        tensor, the reference is what most peers at the newest revision hold;
        a peer whose tensor differs (a joiner, a diverged peer) has it
        overwritten with bytes fetched from the holders and verified by hash.
        Arrays from ``empty``/``zeros`` are synced in place with no copy; others
        are staged through one shared segment and the fetched ones copied back.
        """
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise InvalidArgument(f"revision must be a non-negative int, got {revision!r}")
        entries: list[list[Any]] = []
        staged: list[tuple[str, npt.NDArray[Any], int]] = []
        for name, arr in named_tensors.items():
            if not isinstance(name, str) or not isinstance(arr, np.ndarray):
                raise InvalidArgument(f"sync_state takes str -> numpy array, got {name!r:.40}")
            where = self._locate(arr)
            if where is None:
                staged.append((name, arr, 0))
            else:
                entries.append([name, where[0].name, where[1], arr.dtype.name, list(arr.shape)])
        staging = None
        if staged:
            # 64-byte aligned slots in one segment: one mapping however many tensors.
            offsets, end = [], 0
            for _, arr, _ in staged:
                offsets.append(end)
                end += -(-arr.nbytes // 64) * 64
            staging = self._stage(max(end, 1))
            for (name, arr, _), off in zip(staged, offsets, strict=True):
                dest = staging[1][off : off + arr.nbytes].view(arr.dtype).reshape(arr.shape)
                np.copyto(dest, arr)
                entries.append([name, staging[0].name, off, arr.dtype.name, list(arr.shape)])
            staged = [(n, a, off) for (n, a, _), off in zip(staged, offsets, strict=True)]
        try:
            rid = self._send(
                "sync_state",
                tensors=entries,
                revision=revision,
                epoch=self.epoch,
                timeout_s=timeout_s,
            )
            reply = self._wait_reply(rid, timeout_s)
            result = SyncResult.from_wire(reply)
            if staging is not None:
                fetched = set(result.fetched)
                for name, arr, off in staged:
                    if name in fetched:
                        src = staging[1][off : off + arr.nbytes].view(arr.dtype)
                        np.copyto(arr, src.reshape(arr.shape))
        finally:
            if staging is not None:
                self._staging.append(staging)
        return result

    def leave(self) -> None:
        self._call("leave", timeout_s=10.0)

    def close(self) -> None:
        if self.closed:
            return
        # Drop our references to the mapped arrays first, so a segment whose
        # arrays the caller no longer holds is unmapped right away.
        segments = [seg for seg, _ in self._segments.values()]
        segments += [seg for seg, _ in self._staging]
        # The daemon keeps segments mapped until told; unlinked pages stay
        # allocated while anyone maps them. Best effort: a gone daemon is fine.
        for seg in segments:
            msg = {"id": next(self._ids), "op": "release", "shm": seg.name}
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send(msgpack.packb(msg, use_bin_type=True), zmq.NOBLOCK)
        self.closed = True
        self._sock.close(linger=200)
        self._segments.clear()
        self._staging.clear()
        for seg in segments:
            seg.close()

    def __enter__(self) -> Comm:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- request plumbing --------------------------------------------------
    def _send(self, op: str, **fields: Any) -> int:
        if self.closed:
            raise DaemonUnavailable("this Comm is closed")
        rid = next(self._ids)
        msg = {"id": rid, "op": op, **{k: v for k, v in fields.items() if v is not None}}
        with self._lock:
            self._sock.send(msgpack.packb(msg, use_bin_type=True))
        return rid

    def _call(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        rid = self._send(op, **fields)
        return self._wait_reply(rid, timeout_s)

    def _poll_reply(self, rid: int) -> bool:
        with self._lock:
            self._drain(0)
            return rid in self._replies

    def _drain(self, timeout_ms: int) -> None:
        if self._sock.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    body = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                reply = msgpack.unpackb(body, raw=False)
                self._replies[int(reply.get("id") or 0)] = reply

    def _wait_reply(self, rid: int, timeout_s: float | None) -> dict[str, Any]:
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                reply = self._replies.pop(rid, None)
                if reply is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Timeout(
                            f"no reply from the daemon at {self.address} within {limit:.1f}s"
                        )
                    self._drain(int(min(left, 0.05) * 1000) + 1)
                    reply = self._replies.pop(rid, None)
            if reply is not None:
                break
        if not reply.get("ok"):
            raise CollnetError.from_wire(reply.get("error") or {})
        return reply


def connect(address: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """Connect to the local daemon at ``address`` (default: ``$COLLNET_DAEMON``)."""
    address = address or os.environ.get("COLLNET_DAEMON")
    if not address:
        raise DaemonUnavailable("no daemon address given and COLLNET_DAEMON is not set")
    return Comm(address, timeout_s)
