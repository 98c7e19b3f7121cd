"""The thin client: a trainer process talking to its node's daemon.

Control messages are msgpack over a pyzmq DEALER socket; tensor bytes stay in
shared memory that both processes map. Arrays allocated with
``Comm.empty``/``Comm.zeros`` (and CPU torch tensors over them) live in shared
memory already and are reduced in place with no copy; any other numpy array
or CPU tensor is copied into a staging segment and back (one copy each way);
a CUDA tensor is copied device-to-host into staging and back on success.

A daemon that exits or is killed closes the IPC connection; a zmq socket
monitor sees that, and every call waiting on it fails at once with
``DaemonUnavailable`` instead of waiting out its timeout.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import zmq
from zmq.utils.monitor import recv_monitor_message

from collnet.addresses import DEFAULT_IPC, DEFAULT_TCP_PORT, loopback_tcp
from collnet.algo.ops import DTYPE_BY_NAME
from collnet.codec.minmax import DEFAULT_BLOCK_SIZE
from collnet.errors import CollnetError, DaemonUnavailable, InvalidArgument, PeerLost, Timeout
from collnet.transport.shm import SharedBuffer
from collnet_client.feedback import ErrorFeedback
from collnet_client.tensors import HostTensor, host_tensor, is_torch_tensor

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
    """An all-reduce in flight.

    ``wait()`` returns the caller's tensor, reduced in place (or raises the
    typed error of a failed collective); ``done()`` says whether ``wait()``
    would return at once; ``cancel()`` aborts the collective on every peer.
    Several handles may be in flight at once.
    """

    def __init__(self, comm: Comm, request: _AllReduce) -> None:
        self._comm = comm
        self._req = request
        self._finished = False
        self._error: CollnetError | None = None

    @property
    def tag(self) -> int | str:
        return self._req.tag

    @property
    def epoch(self) -> int:
        return self._req.epoch

    def done(self) -> bool:
        if not self._finished:
            return self._comm._poll_reply(self._req.rid)
        return True

    def wait(self, timeout_s: float | None = None) -> Any:
        """The reduced tensor, or the collective's error.

        A ``Timeout`` because ``timeout_s`` ran out here (rather than the
        collective's own deadline) leaves the collective running: wait again,
        or ``cancel()``.
        """
        if not self._finished:
            try:
                self._comm._finish_all_reduce(self._req, timeout_s)
            except CollnetError as exc:
                if exc.fields.get("reply_pending"):
                    raise
                self._error = exc
            self._finished = True
        if self._error is not None:
            raise self._error
        return self._req.host.original

    def cancel(self, timeout_s: float = 30.0) -> bool:
        """Abort this collective on every peer (they get ``CollectiveAborted``).

        Returns True if it was aborted, False if it had finished first. When
        it returns, the daemon no longer touches the tensor. A cancel that
        races with completion may leave other peers finishing it: treat a
        cancelled step as failed everywhere (call ``update_topology``, sync).
        """
        if self._finished or self.done():
            return False
        req = self._req
        req.retries = 0
        self._comm._call("cancel", timeout_s=timeout_s, epoch=req.epoch, tag=req.tag)
        try:
            self.wait(timeout_s)
        except CollnetError as exc:
            if exc.fields.get("reply_pending"):
                raise
            return True
        return False


@dataclass
class _AllReduce:
    """One all-reduce request as the SDK tracks it across retries."""

    host: HostTensor
    fields: dict[str, Any]
    tag: int | str
    epoch: int
    rid: int
    # The host array the daemon reduces: a view of the caller's bytes, or staging.
    view: npt.NDArray[Any]
    staging: tuple[SharedBuffer, npt.NDArray[Any]] | None
    retries: int
    # The input as sent, kept only when retries are allowed (the daemon reduces in place).
    saved: npt.NDArray[Any] | None
    # Puts the error-feedback residual back as it was if nothing was sent after all.
    undo_feedback: Callable[[], None] | None = None


# Requests that every trainer of a node makes, and the daemon answers once for all.
_LOCAL_GROUP_OPS = frozenset({"update_topology", "all_reduce", "sync_state"})


class Comm:
    """A connection to the local daemon; see the module docstring."""

    def __init__(
        self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, local_size: int = 1
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        if not isinstance(local_size, int) or local_size < 1:
            raise InvalidArgument(f"local_size must be a positive int, got {local_size!r}")
        # Trainers on this node sharing the daemon (one per GPU, say): their
        # collectives are reduced in the daemon first and cross the network once.
        self.local_size = local_size
        path = address.removeprefix("ipc://")
        if path != address and not path.startswith("@") and not os.path.exists(path):
            # zmq would wait for the socket to appear: fail now, not after the hello timeout.
            raise DaemonUnavailable(f"no daemon listens at {address} ({path} does not exist)")
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Sees the daemon's side of the connection close (exit, kill -9).
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        )
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._lost: str | None = None
        self._sock.connect(address)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._tags = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        # id(base ndarray) -> (its segment, that ndarray). Holding the ndarray keeps
        # its id from being reused by an unrelated array once the caller drops it;
        # a reused id would send a plain array's all-reduce to a stale segment.
        self._segments: dict[int, tuple[SharedBuffer, npt.NDArray[Any]]] = {}
        # Start addresses of the mapped segments (sorted) and the segment at each:
        # any array lying inside one (a slice, a torch tensor over it) needs no copy.
        self._starts: list[int] = []
        self._by_start: dict[int, SharedBuffer] = {}
        self._staging: list[tuple[SharedBuffer, npt.NDArray[Any]]] = []
        self._staging_made: dict[str, SharedBuffer] = {}
        self.closed = False
        try:
            hello = self._call("hello", timeout_s=min(timeout_s, 10.0))
        except Timeout:
            self.close()
            raise DaemonUnavailable(f"no daemon answers at {address}") from None
        except BaseException:
            self.close()
            raise
        self.peer_id: str = hello["peer"]
        self.feedback = ErrorFeedback(int(hello.get("codec_block_size") or DEFAULT_BLOCK_SIZE))
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
        """Agree on the world with every active peer (a barrier); admits pending peers.

        In a new epoch the default tags count from 1 again, so the members,
        joiners included, agree on them without passing tags.
        """
        self._world = World.from_wire(self._call("update_topology", timeout_s=timeout_s)["world"])
        if self._world.epoch != self.epoch:
            self._tags = itertools.count(1)
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
        self._index(seg, base)
        return base.reshape(shape)

    def zeros(
        self, shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float32
    ) -> npt.NDArray[Any]:
        arr = self.empty(shape, dtype)
        arr.fill(0)
        return arr

    def _index(self, seg: SharedBuffer, base: npt.NDArray[Any]) -> None:
        start = int(base.__array_interface__["data"][0])
        bisect.insort(self._starts, start)
        self._by_start[start] = seg

    def _locate(self, arr: npt.NDArray[Any]) -> tuple[SharedBuffer, int] | None:
        """The segment and offset of ``arr``'s bytes, if they are contiguous in one of ours.

        By address rather than by ``arr.base``: a torch tensor over an SDK array
        (``torch.from_numpy``) gives back numpy views with unrelated bases.
        """
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

    def _stage(self, nbytes: int) -> tuple[SharedBuffer, npt.NDArray[Any]]:
        for i, (seg, _) in enumerate(self._staging):
            if seg.nbytes >= nbytes:
                return self._staging.pop(i)
        seg = SharedBuffer.create(nbytes)
        # Every staging segment, pooled or lent to a request: close() frees them
        # all, also those of requests that were never waited for.
        self._staging_made[seg.name] = seg
        return seg, seg.array(np.uint8, nbytes)

    # -- collectives -------------------------------------------------------
    def all_reduce(
        self,
        tensor: Any,
        op: str = "sum",
        codec: str = "none",
        algo: str = "auto",
        tag: int | str | None = None,
        timeout_s: float | None = None,
        *,
        retry: int = 0,
        error_feedback: bool = False,
        feedback_key: Any = None,
    ) -> Any:
        """Reduce ``tensor`` (numpy array or torch tensor) across the world, in place.

        Returns the same tensor. See ``all_reduce_async`` for the arguments.
        """
        return self.all_reduce_async(
            tensor,
            op,
            codec,
            algo,
            tag,
            timeout_s,
            retry=retry,
            error_feedback=error_feedback,
            feedback_key=feedback_key,
        ).wait()

    def all_reduce_async(
        self,
        tensor: Any,
        op: str = "sum",
        codec: str = "none",
        algo: str = "auto",
        tag: int | str | None = None,
        timeout_s: float | None = None,
        *,
        retry: int = 0,
        error_feedback: bool = False,
        feedback_key: Any = None,
    ) -> Handle:
        """Start an all-reduce of ``tensor``; the returned handle's ``wait()`` finishes it.

        ``op``: sum, avg, min, max, prod. ``codec``: none, fp16, bf16, uint8,
        uint4 (quantized on the wire; every peer ends bit-identical). ``tag``
        names the collective within the epoch: every peer must pass the same
        (default: a counter that restarts at every new epoch).

        ``retry``: on ``PeerLost``, up to this many times call
        ``update_topology`` and run the same collective again in the shrunken
        world, from the original input (kept in a copy for tensors reduced in
        place). Every survivor must retry the same way; a survivor that had
        already completed the collective does not, and the retry then fails
        with ``Timeout``: use it where every survivor fails together (see
        docs/sdk.md), or resolve a failed step with ``sync_state``.

        ``error_feedback``: for a lossy codec, add the quantization error of
        this tensor's previous call to its input (float32 only); the residual
        is kept per ``feedback_key`` (default: the tensor's memory address).
        """
        host = host_tensor(tensor)
        if DTYPE_BY_NAME.get(host.dtype.name) != host.dtype:
            raise InvalidArgument(
                f"unsupported dtype {host.dtype}; use one of {list(DTYPE_BY_NAME)}"
            )
        where = self._locate(host.array) if host.array is not None else None
        staging = None
        if where is None:
            staging = self._stage(host.nbytes)
            view = staging[1][: host.nbytes].view(host.dtype).reshape(host.shape)
            host.copy_into(view)
            where = (staging[0], 0)
        else:
            assert host.array is not None
            view = host.array
        undo_feedback = None
        if error_feedback:
            key = _memory_key(tensor) if feedback_key is None else feedback_key
            try:
                undo_feedback = self.feedback.apply(key, codec, view)
            except BaseException:
                if staging is not None:
                    self._staging.append(staging)
                raise
        fields = {
            "shm": where[0].name,
            "offset": where[1],
            "count": int(view.size),
            "dtype": host.dtype.name,
            "reduce": op,
            "codec": codec,
            "algo": algo,
            "timeout_s": timeout_s,
        }
        req = _AllReduce(
            host=host,
            fields=fields,
            tag=next(self._tags) if tag is None else tag,
            epoch=self.epoch,
            rid=0,
            view=view,
            staging=staging,
            retries=retry,
            saved=view.copy() if retry > 0 else None,
            undo_feedback=undo_feedback,
        )
        self._issue(req)
        return Handle(self, req)

    def _issue(self, req: _AllReduce) -> None:
        req.epoch = self.epoch
        try:
            req.rid = self._send("all_reduce", tag=req.tag, epoch=req.epoch, **req.fields)
        except BaseException:
            self._unstage(req)
            raise

    def _unstage(self, req: _AllReduce) -> None:
        staging, req.staging = req.staging, None
        if staging is None:
            return
        if self.closed:
            staging[0].close()
        else:
            self._staging.append(staging)

    def _finish_all_reduce(self, req: _AllReduce, timeout_s: float | None) -> None:
        """Wait for ``req``'s reply, retrying on PeerLost as it allows; write back.

        A ``Timeout`` with ``reply_pending`` leaves the request pending (and its
        staging still the daemon's): only this wait ran out of time.
        """
        try:
            while True:
                try:
                    self._wait_reply(req.rid, timeout_s)
                    break
                except CollnetError as exc:
                    if exc.fields.get("reply_pending"):
                        raise
                    if isinstance(exc, PeerLost) and req.retries > 0 and req.saved is not None:
                        req.retries -= 1
                        np.copyto(req.view, req.saved)
                        # Another handle's retry may have agreed on the new world already.
                        if self.epoch == req.epoch:
                            self.update_topology(timeout_s)
                        self._issue(req)
                        continue
                    # A staged tensor is only written back on success: it still holds
                    # the caller's input, so a retry is correct as it stands.
                    if req.staging is not None:
                        exc.fields["buffer_modified"] = False
                    if req.undo_feedback is not None:
                        req.undo_feedback()
                    raise
            if req.staging is not None:
                req.host.copy_from(req.view)
        except BaseException as exc:
            if not (isinstance(exc, CollnetError) and exc.fields.get("reply_pending")):
                self._unstage(req)
            raise
        self._unstage(req)

    # -- shared state ------------------------------------------------------
    def sync_state(
        self,
        named_tensors: Mapping[str, Any],
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
        torch tensors are accepted too: CPU ones through a view of their bytes
        (no copy over SDK memory), CUDA or strided ones through a host copy.
        """
        if any(is_torch_tensor(t) for t in named_tensors.values()):
            return self._sync_host_copies(named_tensors, revision, timeout_s)
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
        except CollnetError as exc:
            if exc.fields.get("reply_pending"):
                # The daemon may still fetch into the staging segment: never reuse
                # it (close() frees it).
                staging = None
            raise
        finally:
            if staging is not None:
                self._staging.append(staging)
        return result

    def _sync_host_copies(
        self, named_tensors: Mapping[str, Any], revision: int, timeout_s: float | None
    ) -> SyncResult:
        """``sync_state`` of tensors that are not all numpy arrays: through host arrays."""
        hosts = {name: host_tensor(t) for name, t in named_tensors.items()}
        arrays: dict[str, npt.NDArray[Any]] = {}
        for name, host in hosts.items():
            if host.array is not None:
                arrays[name] = host.array
            else:
                arrays[name] = np.empty(host.shape, host.dtype)
                host.copy_into(arrays[name])
        result = self.sync_state(arrays, revision, timeout_s)
        for name in result.fetched:
            if hosts[name].array is None:
                hosts[name].copy_from(arrays[name])
        return result

    def leave(self) -> None:
        self._call("leave", timeout_s=10.0)

    def close(self) -> None:
        if self.closed:
            return
        # Drop our references to the mapped arrays first, so a segment whose
        # arrays the caller no longer holds is unmapped right away.
        segments = [seg for seg, _ in self._segments.values()]
        segments += self._staging_made.values()
        # The daemon keeps segments mapped until told; unlinked pages stay
        # allocated while anyone maps them. Best effort: a gone daemon is fine.
        for seg in segments:
            msg = {"id": next(self._ids), "op": "release", "shm": seg.name}
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send(msgpack.packb(msg, use_bin_type=True), zmq.NOBLOCK)
        self.closed = True
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=200)
        self._segments.clear()
        self._starts.clear()
        self._by_start.clear()
        self._staging.clear()
        self._staging_made.clear()
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
        if self._lost is not None:
            raise DaemonUnavailable(self._lost)
        rid = next(self._ids)
        msg = {"id": rid, "op": op, **{k: v for k, v in fields.items() if v is not None}}
        if self.local_size > 1 and op in _LOCAL_GROUP_OPS:
            msg["local_size"] = self.local_size
        with self._lock:
            self._sock.send(msgpack.packb(msg, use_bin_type=True))
        return rid

    def _call(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        rid = self._send(op, **fields)
        return self._wait_reply(rid, timeout_s)

    def _poll_reply(self, rid: int) -> bool:
        with self._lock:
            self._drain(0)
            return rid in self._replies or self._lost is not None

    def _drain(self, timeout_ms: int) -> None:
        ready = dict(self._poller.poll(timeout_ms))
        if self._sock in ready:
            while True:
                try:
                    body = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                reply = msgpack.unpackb(body, raw=False)
                self._replies[int(reply.get("id") or 0)] = reply
        if self._monitor in ready:
            while True:
                try:
                    event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if self._lost is not None:
                    continue
                # The daemon's state (world, collectives) died with it: a daemon
                # restarted at this address is another peer, so this Comm stays lost.
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._lost = (
                        f"the daemon at {self.address} ({getattr(self, 'peer_id', '?')}) "
                        "closed the connection: it exited or was killed"
                    )
                elif event["event"] == zmq.EVENT_CONNECT_RETRIED:
                    # A refused connect: nothing listens (say, the socket file of a
                    # killed daemon); zmq would keep retrying until the timeout.
                    self._lost = f"nothing accepts connections at {self.address}"

    def _wait_reply(self, rid: int, timeout_s: float | None) -> dict[str, Any]:
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                reply = self._replies.pop(rid, None)
                if reply is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        # Only this wait gave up: the request may still be running.
                        raise Timeout(
                            f"no reply from the daemon at {self.address} within {limit:.1f}s",
                            reply_pending=True,
                        )
                    self._drain(int(min(left, 0.05) * 1000) + 1)
                    reply = self._replies.pop(rid, None)
                    if reply is None and self._lost is not None:
                        raise DaemonUnavailable(self._lost)
            if reply is not None:
                break
        if not reply.get("ok"):
            raise CollnetError.from_wire(reply.get("error") or {})
        return reply


def _memory_key(tensor: Any) -> tuple[str, int, int]:
    """Where ``tensor``'s bytes live: the default key of its error-feedback residual."""
    if is_torch_tensor(tensor):
        return (str(tensor.device), int(tensor.data_ptr()), int(tensor.nbytes))
    return ("cpu", int(tensor.__array_interface__["data"][0]), int(tensor.nbytes))


def connect(
    address: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    local_size: int | None = None,
) -> Comm:
    """Connect to the local daemon at ``address`` (default: ``$COLLNET_DAEMON``, else
    the daemon's default ``ipc:///tmp/collnet-daemon.sock``, else its loopback
    fallback ``tcp://127.0.0.1:29700``).

    ``local_size`` (default ``$COLLNET_LOCAL_SIZE``, else 1): how many trainers
    of this node share the daemon. Each of them calls every collective; the
    daemon reduces theirs locally, then once across the network (``avg``: the
    mean of the nodes' means). All of them must pass the same ``local_size``.
    """
    if local_size is None:
        env = os.environ.get("COLLNET_LOCAL_SIZE", "1")
        try:
            local_size = int(env)
        except ValueError:
            raise InvalidArgument(f"COLLNET_LOCAL_SIZE must be an int, got {env!r}") from None
    address = address or os.environ.get("COLLNET_DAEMON")
    if address:
        return Comm(address, timeout_s, local_size)
    # The defaults a daemon serves on: its ipc socket if this process can see
    # it, else its loopback TCP fallback.
    tried = []
    for candidate in (DEFAULT_IPC, loopback_tcp(DEFAULT_TCP_PORT)):
        try:
            return Comm(candidate, timeout_s, local_size)
        except DaemonUnavailable as exc:
            tried.append(exc.message)
    raise DaemonUnavailable(
        "no address given, COLLNET_DAEMON not set, and no daemon at the defaults: "
        + "; ".join(tried)
    )
