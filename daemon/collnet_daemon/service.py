"""The peer daemon: membership client, data links, collectives, local API.

One ``Daemon`` per node. It registers with the coordinator (and is pending
until admitted by ``update_topology``), listens for data links from other
daemons, and serves trainers on its IPC socket. A collective runs on the
world of the epoch in which it was called; its key ``(epoch, tag)`` is what
every peer's messages for it carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import xxhash

from collnet.addresses import loopback_tcp
from collnet.algo import ALGORITHMS, make_all_reduce
from collnet.algo.actions import Schedule
from collnet.algo.ops import DTYPE_BY_NAME, OPS, check_op
from collnet.codec.registry import get_codec
from collnet.errors import (
    CollnetError,
    DaemonUnavailable,
    InvalidArgument,
    MismatchError,
    PeerLost,
    ProtocolError,
    Timeout,
)
from collnet.membership import PeerInfo, WorldView
from collnet.state import manifest_of, numpy_dtype
from collnet.transport.link import PeerLink
from collnet.transport.mesh import Mesh
from collnet.transport.shm import SharedBuffer
from collnet.wire import FrameKind
from collnet_daemon import clientops
from collnet_daemon.collectives import CollectiveRun, Router
from collnet_daemon.config import DaemonConfig
from collnet_daemon.control import CoordinatorClient
from collnet_daemon.ipc import IpcServer
from collnet_daemon.localgroup import LocalGroups, local_size_of, reduce_locally
from collnet_daemon.metrics import DaemonMetrics
from collnet_daemon.statesync import StateSync

log = logging.getLogger(__name__)


def _field(req: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = req.get(name, default)
    if value is None and default is None:
        raise InvalidArgument(f"request {req.get('op')!r} needs field {name!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"field {name!r} must be {kind.__name__}, got {value!r:.40}")
    return value


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: its outcome matters to nobody here


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.id = config.peer_id
        self.router = Router(config.max_early_bytes)
        self.router.on_peer_lost = self._on_link_lost
        self.router.on_late = self._tell_late
        self.router.on_early_abort = self._news
        # Set (and replaced) whenever the world moves on or an early ABORT
        # arrives: what collectives waiting for their links watch.
        self._changed = asyncio.Event()
        self.mesh = Mesh(
            self.id,
            config.connections,
            self.router,
            connect_timeout_s=config.connect_timeout_s,
            liveness=config.liveness,
            secret=config.secret,
        )
        self.local = LocalGroups()
        self.state = StateSync(self.id, config.state_chunk_bytes, self.mesh.link_if_ready)
        self.router.state = self.state
        self.coord = CoordinatorClient(self._on_world_push, config.liveness, config.secret)
        self.metrics = DaemonMetrics(self)  # served only if the CLI asks (--metrics-port)
        fallback = loopback_tcp(config.ipc_tcp_port) if config.ipc_tcp_port else None
        self.ipc = IpcServer(config.ipc, self.metrics.observed(self.handle), fallback)
        self.ipc.on_disconnect = self._client_gone
        # Clients that took part in the world (called update_topology), by identity.
        self._trainers: set[bytes] = set()
        self.world = WorldView(0, ())
        self.worlds: dict[int, WorldView] = {}
        self.data_addr: tuple[str, int] = ("", 0)
        self.buffers: dict[str, SharedBuffer] = {}
        self.stopped = asyncio.Event()
        # Why it stopped: True when it announced its leave (a signal or a client's
        # leave request), False when stopped without leaving.
        self.left = False
        self._stopping: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._topology_call: asyncio.Future[dict[str, Any]] | None = None
        self._coord_up = asyncio.Event()
        # A refused sync_state's arrival at the barrier (carrying the error).
        self._refusal: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        host, port = await self.mesh.listen(*self.config.listen)
        self.data_addr = (self.config.advertise_host or host, port)
        await self._join_coordinator()
        self.ipc.start()
        log.info(
            "daemon %s: data %s:%d, ipc %s, pending admission",
            self.id,
            *self.data_addr,
            self.config.ipc,
        )

    async def stop(self, leave: bool = True) -> None:
        """Stop once; a second caller waits until the first caller's stop has finished."""
        if self._stopping is None:
            self.left = leave
            self.stopped.set()
            self._stopping = asyncio.ensure_future(self._stop(leave))
        await asyncio.shield(self._stopping)

    async def _stop(self, leave: bool) -> None:
        if leave and self.router.runs:
            # A graceful leave lets the collectives this peer is part of finish
            # (new ones are refused from now on), so none fails because of it.
            log.info(
                "daemon %s: draining %d collectives before leaving", self.id, len(self.router.runs)
            )
            futures = [run.future for run in self.router.runs.values()]
            await asyncio.wait(futures, timeout=self.config.drain_timeout_s)
        if leave:
            try:
                await self.coord.call("leave", timeout_s=2.0)
                log.info("daemon %s: left the world", self.id)
            except (CollnetError, TimeoutError) as exc:
                log.warning("daemon %s: could not announce leave: %s", self.id, exc)
        self.router.fail_all(DaemonUnavailable(f"daemon {self.id} is shutting down"))
        self.local.fail_all(DaemonUnavailable(f"daemon {self.id} is shutting down"))
        self.state.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.coord.close()
        await self.ipc.close()
        await self.mesh.close()
        for buf in self.buffers.values():
            buf.close()
        self.buffers.clear()

    async def _join_coordinator(self) -> None:
        """Connect, authenticate and register; a member reports the world it holds,
        which is how a restarted coordinator (soft state) gets the world back."""
        coord = CoordinatorClient(self._on_world_push, self.config.liveness, self.config.secret)
        await coord.connect(*self.config.coordinator)
        fields: dict[str, Any] = {"peer": PeerInfo(self.id, *self.data_addr).to_wire()}
        if self.id in self.world.ids:
            fields["world"] = self.world.to_wire()
        try:
            reply = await coord.call("register", timeout_s=self.config.connect_timeout_s, **fields)
        except BaseException:
            coord.close()
            raise
        self.coord = coord
        self._set_world(WorldView.from_wire(reply["world"]))
        self._coord_up.set()
        assert coord.lost is not None
        coord.lost.add_done_callback(lambda f: self._coordinator_lost(f.result()))

    def _coordinator_lost(self, exc: CollnetError) -> None:
        self._coord_up.clear()
        if not self.stopped.is_set():
            # Collectives need no coordinator: keep serving them, and reconnect.
            log.warning("daemon %s: %s; reconnecting", self.id, exc.message)
            self._background(self._reconnect())

    async def _reconnect(self) -> None:
        delay_s = 0.2
        while not self.stopped.is_set():
            await asyncio.sleep(delay_s)
            try:
                await self._join_coordinator()
            except (CollnetError, OSError, TimeoutError) as exc:
                log.debug("daemon %s: coordinator still unreachable: %s", self.id, exc)
                delay_s = min(2.0, delay_s * 2)
                continue
            log.info(
                "daemon %s: reconnected to the coordinator (epoch %d)", self.id, self.world.epoch
            )
            return

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("daemon %s: background task failed: %s", self.id, task.exception())

    # -- membership --------------------------------------------------------
    def _news(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_world(self, world: WorldView) -> None:
        if world.epoch < self.world.epoch:
            return
        if world.epoch > self.world.epoch:
            self._news()
        gone = set(self.world.ids) - set(world.ids)
        self.world = world
        self.worlds[world.epoch] = world
        while len(self.worlds) > 64:
            del self.worlds[min(self.worlds)]
        if gone:
            # A frozen peer gives no socket error: the coordinator's verdict is what
            # ends the collectives waiting on it.
            self.router.members_gone(gone, f"removed from the world at epoch {world.epoch}")
        for peer in gone:
            self.mesh.drop(peer, "left the world")
        if self.id in world.ids:
            self._background(self._connect_all(world))

    def _on_world_push(self, world: WorldView) -> None:
        log.info("daemon %s: epoch %d, world %s", self.id, world.epoch, list(world.ids))
        self._set_world(world)

    def _tell_late(self, peer: str, key: tuple[int, int | str], exc: CollnetError) -> None:
        link = self.mesh.link_if_ready(peer)
        if link is not None:
            with contextlib.suppress(CollnetError):
                link.send_control(FrameKind.ABORT, [key[0], key[1], exc.to_wire()])

    def _on_link_lost(self, peer: str, exc: CollnetError) -> None:
        # Links close routinely (a peer left, shutdown); failed collectives are
        # logged by the router, so this is only informational.
        log.info("daemon %s: link to %s closed: %s", self.id, peer, exc.message)

    async def _connect_all(self, world: WorldView) -> dict[int, PeerLink]:
        """Links to every other member of ``world``, keyed by rank."""
        others = [(r, p) for r, p in enumerate(world.peers) if p.id != self.id]
        links = await asyncio.gather(
            *(self.mesh.get_link(p.id, (p.host, p.port)) for _, p in others),
            return_exceptions=True,
        )
        out: dict[int, PeerLink] = {}
        for (rank, _), link in zip(others, links, strict=True):
            if isinstance(link, BaseException):
                if isinstance(link, CollnetError):
                    raise link
                raise PeerLost(f"cannot link to rank {rank}: {link}") from link
            out[rank] = link
        return out

    # -- local API ---------------------------------------------------------
    async def handle(self, ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "hello":
            # The block size lets the SDK's error feedback quantize as the wire does.
            return {
                "peer": self.id,
                "world": self.world.to_wire(),
                "codec_block_size": self.config.codec_block_size,
            }
        if op == "world":
            reply = await self.coord.call("world", timeout_s=10.0)
            world = WorldView.from_wire(reply["world"])
            self._set_world(world)
            return {"world": world.to_wire()}
        local = local_size_of(req)
        if op == "update_topology":
            self._trainers.add(ident)
            if local == 1:
                return await self.update_topology()
            # This node's trainers agree first: the coordinator counts the node once.
            timeout_s = self._timeout_of(req)
            return await self.local.run(
                (op,), local, req, lambda _: self.update_topology(), timeout_s
            )
        if op == "all_reduce":
            if local == 1:
                await self.all_reduce(req)
            else:
                await self._local_all_reduce(req, local)
            return {}
        if op == "sync_state":
            if local == 1:
                return await self.sync_state(req)
            return await self._local_sync_state(req, local)
        if op == "cancel":
            return clientops.cancel(self, req)
        if op == "bench_all_reduce":
            return await clientops.bench_all_reduce(self, req)
        if op == "release":
            buf = self.buffers.pop(_field(req, "shm", str), None)
            if buf is not None:
                buf.close()
            return {}
        if op == "leave":
            asyncio.get_running_loop().call_soon(self._background, self.stop())
            return {}
        raise InvalidArgument(f"unknown request {op!r}")

    async def _await_coordinator(self) -> None:
        """Until this daemon is connected to the coordinator again (unbounded: the
        caller bounds it)."""
        while not (self._coord_up.is_set() and self.coord.connected):
            if self._coord_up.is_set():
                # The loss is known to the connection but not handled here yet.
                await asyncio.sleep(0.02)
            else:
                await self._coord_up.wait()

    async def update_topology(self) -> dict[str, Any]:
        # A daemon that lost the coordinator (a network cut, a coordinator
        # restart) reconnects by itself: the barrier waits for that, bounded,
        # rather than failing a trainer whose daemon is fine.
        deadline = asyncio.get_running_loop().time() + self.config.collective_timeout_s
        while True:
            if not (self._coord_up.is_set() and self.coord.connected):
                left = deadline - asyncio.get_running_loop().time()
                try:
                    await asyncio.wait_for(self._await_coordinator(), max(0.0, left))
                except TimeoutError:
                    raise DaemonUnavailable(
                        f"daemon {self.id}: no coordinator for "
                        f"{self.config.collective_timeout_s:.0f}s"
                    ) from None
            if self._topology_call is None or self._topology_call.done():
                self._topology_call = asyncio.ensure_future(
                    self.coord.call("update_topology", epoch=self.world.epoch)
                )
                self._topology_call.add_done_callback(_quiet)  # its waiters re-raise it
            try:
                reply = await asyncio.shield(self._topology_call)
            except DaemonUnavailable:
                if self.stopped.is_set() or (self._coord_up.is_set() and self.coord.connected):
                    raise
                continue  # the coordinator went away mid-call: again once reconnected
            break
        # The world the barrier agreed on, not a newer one a push brought meanwhile:
        # the other members run this round in that world.
        world = WorldView.from_wire(reply["world"])
        self._set_world(world)
        if self.id in world.ids and world.epoch == self.world.epoch:
            # (An older world's first collective fails at once: no links needed.)
            await self._connect_all(world)
        return {"world": world.to_wire()}

    def _timeout_of(self, req: dict[str, Any]) -> float:
        return float(req.get("timeout_s") or self.config.collective_timeout_s)

    async def _local_all_reduce(self, req: dict[str, Any], local: int) -> None:
        """All-reduce of ``local`` trainers of this node: reduced here, then once
        over the network, the result copied back to each of them."""
        tag = req.get("tag")
        if not isinstance(tag, int | str) or isinstance(tag, bool):
            raise InvalidArgument("all_reduce needs an int or str 'tag'")
        world, _ = self._agreed_world(req)

        async def action(reqs: list[dict[str, Any]]) -> None:
            try:
                shapes = {
                    (r.get("count"), r.get("dtype"), r.get("reduce", "sum"), r.get("codec", "none"),
                     r.get("algo", "auto"))
                    for r in reqs
                }  # fmt: skip
                if len(shapes) != 1:
                    raise MismatchError(
                        f"this node's trainers disagree on all_reduce {tag!r} (count, dtype, "
                        f"op, codec or algorithm): {sorted(map(str, shapes))[:4]}"
                    )
                arrays = [self._request_array(r) for r in reqs]
                op = _field(reqs[0], "reduce", str, "sum")
                check_op(op, arrays[0].dtype)
            except CollnetError as exc:
                # The other nodes would otherwise wait for this one until their deadline.
                self._abort_remote((world.epoch, tag), world, exc)
                raise
            acc = reduce_locally(op, arrays)
            try:
                await self.all_reduce(reqs[0], array=acc)
            except CollnetError as exc:
                exc.fields["buffer_modified"] = False  # only the node's copy was touched
                raise
            for arr in arrays:
                np.copyto(arr, acc)

        await self.local.run(
            ("all_reduce", world.epoch, tag), local, req, action, self._timeout_of(req)
        )

    async def _local_sync_state(self, req: dict[str, Any], local: int) -> dict[str, Any]:
        """One state sync for this node's trainers; each gets the synced state."""
        world, _ = self._agreed_world(req)

        async def action(reqs: list[dict[str, Any]]) -> dict[str, Any]:
            states = [self._state_arrays(r) for r in reqs]
            declared = [{n: (a.dtype, a.shape) for n, a in st.items()} for st in states]
            if any(d != declared[0] for d in declared[1:]):
                raise MismatchError("this node's trainers declare different shared state")
            result = await self.sync_state(reqs[0])
            for state in states[1:]:
                for name, arr in state.items():
                    np.copyto(arr, states[0][name])
            return result

        return await self.local.run(
            ("sync_state", world.epoch), local, req, action, self._timeout_of(req)
        )

    def _request_array(self, req: dict[str, Any]) -> npt.NDArray[Any]:
        """The tensor an all_reduce request names, mapped from the client's segment."""
        dtype_name = _field(req, "dtype", str)
        dtype = DTYPE_BY_NAME.get(dtype_name)
        if dtype is None:
            raise InvalidArgument(
                f"unsupported dtype {dtype_name!r}; use one of {list(DTYPE_BY_NAME)}"
            )
        count = _field(req, "count", int)
        offset = _field(req, "offset", int, 0)
        return self._buffer(_field(req, "shm", str)).array(dtype, count, offset)

    def _client_gone(self, ident: bytes) -> None:
        if ident not in self._trainers:
            return
        self._trainers.discard(ident)
        if self._trainers or not self.config.leave_when_trainers_exit or self._stopping is not None:
            return
        # Nobody here will call the next barrier: staying a member would hold the
        # other peers at it until their deadline.
        log.warning("daemon %s: its last trainer disconnected; leaving the world", self.id)
        self._background(self.stop())

    def _buffer(self, name: str) -> SharedBuffer:
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = SharedBuffer.attach(name)
        return buf

    def _plan_all_reduce(
        self,
        req: dict[str, Any],
        world: WorldView,
        rank: int,
        array: npt.NDArray[Any] | None = None,
    ) -> tuple[Schedule, int]:
        """Validate an all_reduce request; its schedule and digest.

        ``array``: reduce this one instead of the tensor the request names.
        """
        if array is None:
            array = self._request_array(req)
        dtype_name = array.dtype.name
        op = _field(req, "reduce", str, "sum")
        if op not in OPS:
            raise InvalidArgument(f"unknown reduce op {op!r}; use one of {list(OPS)}")
        algo = _field(req, "algo", str, "auto")
        if algo not in ALGORITHMS:
            raise InvalidArgument(f"unknown algorithm {algo!r}; use one of {list(ALGORITHMS)}")
        codec = get_codec(
            _field(req, "codec", str, "none"), block_size=self.config.codec_block_size
        )
        count = array.size
        schedule = make_all_reduce(
            algo,
            rank,
            world.size,
            array,
            op,
            codec=None if codec.name == "none" else codec,
            chunk_bytes=self.config.chunk_bytes,
            star_max_bytes=self.config.star_max_bytes,
        )
        # Peers must agree on everything that shapes the messages.
        digest = xxhash.xxh32_intdigest(
            f"{count}|{dtype_name}|{op}|{codec.name}|{algo}|{self.config.chunk_bytes}|"
            f"{self.config.codec_block_size}|{self.config.star_max_bytes}".encode()
        )
        return schedule, digest

    def _state_arrays(self, req: dict[str, Any]) -> dict[str, Any]:
        """The named tensors of a sync_state request, mapped from the client's segments."""
        tensors = req.get("tensors")
        if not isinstance(tensors, list):
            raise InvalidArgument("sync_state needs a list 'tensors' of [name, shm, offset, ...]")
        arrays: dict[str, Any] = {}
        for item in tensors:
            if not isinstance(item, list) or len(item) != 5:
                raise InvalidArgument("each tensor is [name, shm, offset, dtype, shape]")
            name, shm, offset, dtype, shape = item
            if not isinstance(name, str) or name in arrays:
                raise InvalidArgument(f"tensor names must be distinct strings, got {name!r:.40}")
            if not isinstance(shm, str) or not isinstance(offset, int) or isinstance(offset, bool):
                raise InvalidArgument(f"tensor {name!r}: bad shared-memory location")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise InvalidArgument(f"tensor {name!r}: bad shape {shape!r:.40}")
            count = 1
            for d in shape:
                count *= d
            dt = numpy_dtype(dtype) if isinstance(dtype, str) else None
            if dt is None:
                raise InvalidArgument(f"tensor {name!r}: bad dtype {dtype!r:.40}")
            arrays[name] = self._buffer(shm).array(dt, count, offset).reshape(shape)
        return arrays

    async def sync_state(self, req: dict[str, Any]) -> dict[str, Any]:
        """Bring the client's named tensors to the world's reference state (a barrier)."""
        if self._stopping is not None:
            raise DaemonUnavailable(f"daemon {self.id} is leaving")
        world, _ = self._agreed_world(req)
        timeout_s = self._timeout_of(req)

        async def links() -> dict[str, PeerLink]:
            by_rank = await self._links_for(world, "sync_state")
            return {world.peers[r].id: link for r, link in by_rank.items()}

        async def barrier(name: str, arrived: Any) -> dict[str, Any]:
            fields: dict[str, Any] = {"name": name, "epoch": world.epoch}
            payload = b""
            if isinstance(arrived, bytes):
                payload = arrived
            else:
                fields["report"] = arrived
            while True:
                try:
                    reply = await self.coord.call("barrier", payload=payload, **fields)
                    break
                except DaemonUnavailable:
                    if self.stopped.is_set():
                        raise
                # The coordinator went away (restarted, or this daemon was cut off):
                # once reconnected, call again if the world is the same, else the
                # world changed under this sync (this peer may have been dropped).
                await self._await_coordinator()
                self._still_current(world, "sync_state")
                if self.id not in self.world.ids:
                    raise PeerLost(
                        f"daemon {self.id} was removed from the world during sync_state: "
                        "call update_topology, then retry",
                        peer=self.id,
                        epoch=world.epoch,
                    )
            try:
                blobs = msgpack.unpackb(reply.get("payload", b""), raw=False)
            except (ValueError, msgpack.UnpackException) as exc:
                raise ProtocolError(f"bad {name} barrier answer: {exc}") from None
            if not isinstance(blobs, dict):
                raise ProtocolError(f"bad {name} barrier answer from the coordinator")
            return blobs

        if self._refusal is not None:
            self._refusal.cancel()  # this call takes its place at the barrier
            self._refusal = None
        try:
            revision = _field(req, "revision", int)
            arrays = self._state_arrays(req)
            # Hashing hundreds of MiB must not stall heartbeats on this loop.
            mine = await asyncio.to_thread(manifest_of, arrays, revision)
        except CollnetError as exc:
            # This client hears at once; the other members, who would otherwise
            # wait for this peer at the barrier, get the error from there.
            self._refusal = asyncio.ensure_future(
                asyncio.wait_for(self.state.refuse(barrier, exc), timeout_s)
            )
            self._refusal.add_done_callback(_quiet)
            raise
        try:
            return await asyncio.wait_for(self.state.sync(mine, arrays, links, barrier), timeout_s)
        except TimeoutError:
            raise Timeout(
                f"sync_state at epoch {world.epoch} did not finish within {timeout_s:.1f}s",
                epoch=world.epoch,
                buffer_modified=True,
            ) from None

    def _abort_remote(
        self, key: tuple[int, int | str], world: WorldView, exc: CollnetError
    ) -> None:
        for peer in world.peers:
            link = self.mesh.link_if_ready(peer.id) if peer.id != self.id else None
            if link is not None:
                with contextlib.suppress(CollnetError):
                    link.send_control(FrameKind.ABORT, [key[0], key[1], exc.to_wire()])

    async def _settle(self, run: CollectiveRun, timeout_s: float = 1.0) -> None:
        """Before a failed collective's buffer goes back to its owner, make sure no
        piece still being received can land in it: wait briefly, then cut the links
        still writing."""
        try:
            await asyncio.wait_for(run.settled.wait(), timeout_s)
        except TimeoutError:
            for peer in list(run.writing):
                log.warning(
                    "collective %s: dropping link to %s, still writing into a "
                    "failed collective's buffer",
                    run.key,
                    peer,
                )
                self.mesh.drop(peer, "still writing into a failed collective")

    async def _links_for(
        self, world: WorldView, what: str, key: tuple[int, int | str] | None = None
    ) -> dict[int, PeerLink]:
        """Links to every other member of ``world``, given up as soon as the world
        moves on or another member aborts ``key``: a link to a peer that just died
        would otherwise be awaited for the whole connect timeout."""
        if world.size == 1:
            return {}
        task = asyncio.ensure_future(self._connect_all(world))
        try:
            while True:
                news = asyncio.ensure_future(self._changed.wait())
                done, _ = await asyncio.wait({task, news}, return_when=asyncio.FIRST_COMPLETED)
                news.cancel()
                if task in done:
                    break
                self._still_current(world, what)
                aborted = self.router.early_aborts.get(key) if key is not None else None
                if aborted is not None and world.rank_of(aborted[0]) is not None:
                    raise aborted[1]
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_quiet)
        links = task.result()
        self._still_current(world, what)
        return links

    def _still_current(self, world: WorldView, what: str) -> None:
        """Raise ``PeerLost`` if the world moved on while ``what`` was being set up
        (links take time). Nobody would fail a collective registered after the
        verdict that changed the world, and its partners, in the new world, would
        never send: a member left, or this very peer was dropped (frozen, cut
        off) and admitted again, which leaves the member list looking the same."""
        if self.world.epoch == world.epoch:
            return
        gone = sorted(set(world.ids) - set(self.world.ids))
        raise PeerLost(
            f"{what}: the world changed while it was being set up (epoch {world.epoch} "
            f"-> {self.world.epoch}; lost {gone or 'none, but this peer was re-admitted'}): "
            "call update_topology, then retry",
            peer=gone[0] if gone else self.id,
            epoch=world.epoch,
        )

    def _agreed_world(self, req: dict[str, Any]) -> tuple[WorldView, int]:
        """The world a collective request runs in, and this peer's rank there.

        That is the epoch the trainer agreed to at ``update_topology``: if the
        world changed since, the request fails at once (every survivor's does),
        so no two peers ever run one collective in different worlds.
        """
        world = self.world
        epoch = req.get("epoch", world.epoch)
        if not isinstance(epoch, int) or epoch > world.epoch:
            raise InvalidArgument(f"bad epoch {epoch!r} (this daemon is at {world.epoch})")
        if epoch < world.epoch:
            then = self.worlds.get(epoch)
            gone = sorted(set(then.ids) - set(world.ids)) if then is not None else []
            raise PeerLost(
                f"the world changed since epoch {epoch} (now {world.epoch}; lost {gone}): "
                "call update_topology, then retry",
                peer=gone[0] if gone else None,
                epoch=epoch,
            )
        rank = world.rank_of(self.id)
        if rank is None:
            raise InvalidArgument(
                f"daemon {self.id} is not an active member yet: call update_topology first"
            )
        return world, rank

    async def all_reduce(self, req: dict[str, Any], array: npt.NDArray[Any] | None = None) -> None:
        if self._stopping is not None:
            raise DaemonUnavailable(f"daemon {self.id} is leaving")
        tag = req.get("tag")
        if not isinstance(tag, int | str) or isinstance(tag, bool):
            raise InvalidArgument("all_reduce needs an int or str 'tag'")
        world, rank = self._agreed_world(req)
        key = (world.epoch, tag)
        try:
            schedule, digest = self._plan_all_reduce(req, world, rank, array)
        except CollnetError as exc:
            # The other peers would otherwise wait for this one until their deadline.
            self._abort_remote(key, world, exc)
            raise
        timeout_s = float(req.get("timeout_s") or self.config.collective_timeout_s)
        links = await self._links_for(world, f"all_reduce {key}", key)
        run = CollectiveRun(key, world, rank, schedule, digest, links, self.router.finish)
        started = time.perf_counter()
        self.router.register(run)
        try:
            await asyncio.wait_for(asyncio.shield(run.future), timeout_s)
        except TimeoutError:
            self.router.expire(run, timeout_s)
            await self._settle(run)
            raise Timeout(
                f"all_reduce {key} timed out after {timeout_s:.1f}s",
                epoch=key[0],
                tag=tag,
                buffer_modified=True,
            ) from None
        except CollnetError as exc:
            # The schedule reduces in place: the tensor may hold partial sums now.
            exc.fields["buffer_modified"] = True
            await self._settle(run)
            raise
        # Sent payloads may be views of the caller's tensor: they must reach the
        # kernel before the caller may touch the tensor again.
        await asyncio.gather(*(link.drain() for link in links.values()), return_exceptions=True)
        log.debug(
            "all_reduce %s: %s x %s in %.3f ms",
            key,
            req.get("count"),
            req.get("dtype"),
            (time.perf_counter() - started) * 1e3,
        )
