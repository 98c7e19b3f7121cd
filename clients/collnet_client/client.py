"""The thin client: a trainer process talking to its node's daemon.

``Comm`` is the facade a trainer holds; each part of the work has its own
owner, wired here once:

- ``transport.Transport``: the pyzmq DEALER socket, request ids, replies, and
  the daemon's death seen by a zmq socket monitor (every waiting call fails
  at once with ``DaemonUnavailable`` instead of waiting out its timeout);
- ``memory.SharedMemory``: the shared-memory segments the SDK created, where
  an array lies in them, and staging buffers;
- ``world.Agreement``: the epoch this trainer agreed to and its default tags;
- ``handles.AllReduces``: all-reduces in flight (staging, retry, error
  feedback) and their ``Handle``;
- ``collectives.Collectives``: broadcast, all-gather(-v), reduce-scatter and
  barrier (docs/sdk.md, "Collectives");
- ``sharedstate.StateSync``: ``sync_state``.

Requests are the typed ones of ``collnet.wire.localapi``, which the daemon
parses: SDK and daemon share one definition of every message.

Control messages are msgpack over the socket; tensor bytes stay in shared
memory that both processes map. Arrays allocated with
``Comm.empty``/``Comm.zeros`` (and CPU torch tensors over them) live in shared
memory already and are reduced in place with no copy; any other numpy array
or CPU tensor is copied into a staging segment and back (one copy each way);
a CUDA tensor is copied device-to-host into staging and back on success.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from collnet.addresses import DEFAULT_IPC, DEFAULT_TCP_PORT, loopback_tcp
from collnet.errors import DaemonUnavailable, InvalidArgument
from collnet.wire.localapi import BenchAllReduce, Leave, Release
from collnet.wire.localreplies import SyncStateReply
from collnet_client.collectives import Collectives
from collnet_client.feedback import ErrorFeedback
from collnet_client.handles import AllReduces, Handle
from collnet_client.memory import SharedMemory
from collnet_client.sharedstate import StateSync
from collnet_client.transport import Transport
from collnet_client.world import Agreement, World

DEFAULT_TIMEOUT_S = 600.0

# What ``Comm.sync_state`` did; the daemon's reply, as the SDK has always named it.
SyncResult = SyncStateReply

__all__ = ["DEFAULT_TIMEOUT_S", "Comm", "Handle", "SyncResult", "World", "connect"]


class Comm:
    """A connection to the local daemon; see the module docstring.

    ``daemon_gone``: asked while a call waits for the daemon; a true answer
    fails the call (and every later one) with ``DaemonUnavailable``. For a
    supervisor that knows the daemon is gone before its connection closes (a
    frozen daemon, one about to be killed).
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        local_size: int = 1,
        *,
        daemon_gone: Callable[[], bool] | None = None,
        token_file: str | None = None,
        local_rank: int | None = None,
    ) -> None:
        if not isinstance(local_size, int) or isinstance(local_size, bool) or local_size < 1:
            raise InvalidArgument(f"local_size must be a positive int, got {local_size!r}")
        if local_size == 1 and local_rank is None:
            local_rank = 0
        if local_rank is not None and (
            not isinstance(local_rank, int)
            or isinstance(local_rank, bool)
            or not 0 <= local_rank < local_size
        ):
            raise InvalidArgument(
                f"local_rank must be an int in [0, local_size {local_size}), got {local_rank!r}"
            )
        self.address = address
        # Trainers on this node sharing the daemon (one per GPU, say): their
        # collectives are reduced in the daemon first and cross the network once.
        self.local_size = local_size
        # This trainer's place among them (None: not given, so only all-reduce
        # and sync_state, which need no order among a node's trainers).
        self.local_rank = local_rank
        self._transport = Transport(
            address, timeout_s, daemon_gone=daemon_gone, token_file=token_file
        )
        hello = self._transport.hello
        self.peer_id: str = hello.peer
        self.feedback = ErrorFeedback(hello.codec_block_size)
        self.memory = SharedMemory()
        self._agreement = Agreement(self._transport, World.of(hello.world), local_size)
        self._all_reduces = AllReduces(
            self._transport, self.memory, self._agreement, self.feedback, local_size
        )
        self._state = StateSync(self._transport, self.memory, self._agreement, local_size)
        self._collectives = Collectives(
            self._transport, self.memory, self._agreement, local_size, local_rank
        )

    @property
    def timeout_s(self) -> float:
        """The default deadline of every call."""
        return self._transport.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._transport.timeout_s = value

    @property
    def closed(self) -> bool:
        return self._transport.closed

    # -- membership --------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch this trainer agreed to (at connect, then at ``update_topology``)."""
        return self._agreement.epoch

    @property
    def rank(self) -> int:
        """This trainer's rank in the world of the epoch it agreed to: its peer's
        position in that world's peer list (``node_rank``), times ``local_size``,
        plus ``local_rank``; ``InvalidArgument`` while it is not a member."""
        return self._collectives.rank()

    @property
    def node_rank(self) -> int:
        """This peer's position in the agreed world's peer list."""
        return self._collectives.node_rank()

    @property
    def size(self) -> int:
        """How many trainers the world of the agreed epoch has: its peers times
        ``local_size`` (every node runs as many)."""
        return self._agreement.world.size * self.local_size

    @property
    def world(self) -> World:
        """The world as the daemon sees it now; agrees to nothing."""
        return self._agreement.look()

    def update_topology(self, timeout_s: float | None = None) -> World:
        """Agree on the world with every active peer (a barrier); admits pending peers.

        In a new epoch the default tags count from 1 again, so the members,
        joiners included, agree on them without passing tags.
        """
        return self._agreement.update_topology(timeout_s)

    # -- memory ------------------------------------------------------------
    def empty(
        self, shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float32
    ) -> npt.NDArray[Any]:
        """An array in shared memory: all-reduces on it cost no copy."""
        return self.memory.empty(shape, dtype)

    def zeros(
        self, shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float32
    ) -> npt.NDArray[Any]:
        arr = self.empty(shape, dtype)
        arr.fill(0)
        return arr

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
        return self._all_reduces.start(
            tensor,
            op,
            codec,
            algo,
            tag,
            timeout_s,
            retry=retry,
            error_feedback=error_feedback,
            feedback_key=feedback_key,
        )

    # -- broadcast, all-gather, reduce-scatter, barrier ------------------------
    # Each blocking call is its ``*_async`` twin's ``wait()``: see docs/sdk.md.
    def broadcast(
        self,
        tensor: Any,
        root: int,
        codec: str = "none",
        algo: str = "auto",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Overwrite ``tensor`` on every rank with rank ``root``'s, in place; returns it."""
        return self.broadcast_async(tensor, root, codec, algo, tag, timeout_s).wait()

    def broadcast_async(
        self,
        tensor: Any,
        root: int,
        codec: str = "none",
        algo: str = "auto",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Handle:
        """Start a broadcast; ``algo``: auto, chain or star. With a quantizing
        codec (float tensors) every rank, the root too, ends with the same
        decoded values."""
        return self._collectives.broadcast(tensor, root, codec, algo, tag, timeout_s)

    def all_gather(
        self,
        tensor: Any,
        out: Any = None,
        codec: str = "none",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Every rank's ``tensor`` in rank order: ``out`` (default a new array of shape
        ``(size, *tensor.shape)``; a given one needs ``size * numel`` elements)."""
        return self.all_gather_async(tensor, out, codec, tag, timeout_s).wait()

    def all_gather_async(
        self,
        tensor: Any,
        out: Any = None,
        codec: str = "none",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Handle:
        return self._collectives.all_gather(tensor, out, codec, tag, timeout_s)

    def all_gather_v(
        self,
        tensor: Any,
        codec: str = "none",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """Every rank's ``tensor`` (flattened; element counts may differ, 0 too), in
        rank order: a list of 1-D arrays (torch tensors for a torch input)."""
        result: list[Any] = self.all_gather_v_async(tensor, codec, tag, timeout_s).wait()
        return result

    def all_gather_v_async(
        self,
        tensor: Any,
        codec: str = "none",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Handle:
        return self._collectives.all_gather_v(tensor, codec, tag, timeout_s)

    def reduce_scatter(
        self,
        tensor: Any,
        out: Any = None,
        op: str = "sum",
        codec: str = "none",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """This rank's block of ``op`` over every rank's ``tensor`` (flattened): block
        ``k`` is ``collnet.algo.reducescatter.output_range(numel, size, k)``. The
        input is not modified; ``out`` (default a new 1-D array) receives it."""
        return self.reduce_scatter_async(tensor, out, op, codec, tag, timeout_s).wait()

    def reduce_scatter_async(
        self,
        tensor: Any,
        out: Any = None,
        op: str = "sum",
        codec: str = "none",
        tag: int | str | None = None,
        timeout_s: float | None = None,
    ) -> Handle:
        return self._collectives.reduce_scatter(tensor, out, op, codec, tag, timeout_s)

    def barrier(self, tag: int | str | None = None, timeout_s: float | None = None) -> None:
        """Return once every member of the agreed world has entered the barrier."""
        self.barrier_async(tag, timeout_s).wait()

    def barrier_async(self, tag: int | str | None = None, timeout_s: float | None = None) -> Handle:
        return self._collectives.barrier(tag, timeout_s)

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
        return self._state.sync(named_tensors, revision, timeout_s)

    # -- measurement -------------------------------------------------------
    def bench_all_reduce(
        self,
        count: int,
        *,
        tag: int | str,
        iters: int = 5,
        dtype: npt.DTypeLike = np.float32,
        op: str = "sum",
        codec: str = "none",
        algo: str = "auto",
        barrier: bool = True,
        timeout_s: float | None = None,
    ) -> list[float]:
        """Time ``iters`` all-reduces run inside the daemons, without this SDK; seconds each.

        The daemon allocates a buffer of ``count`` elements of ``dtype`` and
        reduces it as it would a trainer's all-reduce (in the epoch this
        trainer agreed to), timing each one itself: no IPC, no copies, so
        comparing with ``all_reduce`` gives what the SDK costs. Every member
        calls it with the same arguments. The collectives are tagged
        ``{tag}-{i}``; with ``barrier``, a one-element star all-reduce
        (``{tag}-b{i}``) precedes each, so a time covers one collective, not
        the peers' skew. ``timeout_s`` bounds the wait for the whole series
        (default: the Comm's); each collective has the daemon's own deadline.
        """
        request = BenchAllReduce(
            tag=tag,
            count=count,
            iters=iters,
            dtype=np.dtype(dtype).name,
            reduction=op,
            codec=codec,
            algo=algo,
            barrier=barrier,
            epoch=self.epoch,
        )
        reply = self._transport.call(request, timeout_s)
        return [float(t) for t in reply["times_s"]]

    # -- lifecycle ---------------------------------------------------------
    def leave(self) -> None:
        self._transport.call(Leave(), timeout_s=10.0)

    def close(self) -> None:
        if self.closed:
            return
        # The daemon keeps segments mapped until told; unlinked pages stay
        # allocated while anyone maps them. Best effort: a gone daemon is fine,
        # and whatever the socket does, our segments are unlinked.
        try:
            for name in self.memory.names():
                self._transport.post(Release(name))
            self._transport.close()
        finally:
            self.memory.close()

    def __enter__(self) -> Comm:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(
    address: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    local_size: int | None = None,
    token_file: str | None = None,
    local_rank: int | None = None,
) -> Comm:
    """Connect to the local daemon at ``address`` (default: ``$COLLNET_DAEMON``, else
    the daemon's default ``ipc:///tmp/collnet-daemon.sock``, else its loopback
    fallback ``tcp://127.0.0.1:29700``, if the daemon serves one).

    A TCP address needs the daemon's token: read from ``token_file`` (default
    ``$COLLNET_IPC_TOKEN_FILE``, else ``/tmp/collnet-daemon.sock.token``).

    ``local_size`` (default ``$COLLNET_LOCAL_SIZE``, else 1): how many trainers
    of this node share the daemon. Each of them calls every collective; the
    daemon reduces theirs locally, then once across the network (``avg``: the
    mean of the nodes' means). All of them must pass the same ``local_size``.
    ``local_rank`` (default ``$COLLNET_LOCAL_RANK``): this trainer's place among
    them, each of ``0..local_size-1`` once; broadcast, all-gather,
    reduce-scatter and barrier need it when ``local_size`` > 1 (trainer ``l``
    of the node at position ``d`` is rank ``d * local_size + l``).
    """
    if local_size is None:
        local_size = _env_int("COLLNET_LOCAL_SIZE", 1)
    if local_rank is None and "COLLNET_LOCAL_RANK" in os.environ:
        local_rank = _env_int("COLLNET_LOCAL_RANK", 0)
    address = address or os.environ.get("COLLNET_DAEMON")
    if address:
        return Comm(address, timeout_s, local_size, token_file=token_file, local_rank=local_rank)
    # The defaults a daemon serves on: its ipc socket if this process can see
    # it, else its loopback TCP fallback (if the daemon was told to serve one).
    tried = []
    for candidate in (DEFAULT_IPC, loopback_tcp(DEFAULT_TCP_PORT)):
        try:
            return Comm(
                candidate, timeout_s, local_size, token_file=token_file, local_rank=local_rank
            )
        except DaemonUnavailable as exc:
            tried.append(exc.message)
    raise DaemonUnavailable(
        "no address given, COLLNET_DAEMON not set, and no daemon at the defaults: "
        + "; ".join(tried)
    )


def _env_int(name: str, default: int) -> int:
    env = os.environ.get(name, str(default))
    try:
        return int(env)
    except ValueError:
        raise InvalidArgument(f"{name} must be an int, got {env!r}") from None
