"""All-reduce requests: from a trainer's request to a schedule the executor runs.

A request runs in the world of the epoch its trainer agreed to (see
``collnet.membership.peer``). Its schedule is planned from the request and
this daemon's settings, and the peers must agree on everything that shapes
the messages: that is the digest every DATA piece carries. A request this
peer refuses (a bad field, a tensor it cannot map) is refused on the other
members too, at once, or they would wait for this peer until their deadline.

Several trainers of one node (``local_size``) meet in a local group first:
their tensors are reduced here, the sum goes over the network once, and the
result is copied back to each of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import xxhash

from collnet.algo import make_all_reduce
from collnet.algo.actions import Schedule
from collnet.algo.ops import DTYPE_BY_NAME, check_op
from collnet.codec.registry import get_codec
from collnet.errors import CollnetError, DaemonUnavailable, InvalidArgument, MismatchError
from collnet.membership.peer import PeerMembership
from collnet.membership.world import WorldView
from collnet.wire.fields import Tag
from collnet.wire.localapi import AllReduce
from collnet_daemon.buffers import SharedBuffers
from collnet_daemon.config import DaemonConfig
from collnet_daemon.executor import Executor
from collnet_daemon.localgroup import LocalGroups, reduce_locally

log = logging.getLogger(__name__)


class CollectiveObserver(Protocol):
    """Told of every collective this daemon runs (metrics, progress lines)."""

    def collective(
        self, op: str, key: tuple[int, int | str], algo: str, codec: str, nbytes: int, peers: int
    ) -> AbstractContextManager[None]:
        """Wraps the collective ``key`` while it runs (its outcome: the exception)."""


@dataclass(frozen=True)
class Planned:
    """A request made ready to run: its schedule and what is reported about it."""

    schedule: Schedule
    digest: int  # everything that shapes the messages: peers that disagree fail
    algo: str
    codec: str
    nbytes: int
    # A failure says it may have written into the caller's buffers (True) or
    # not (False); None: the error as the executor raised it.
    modifies: bool | None = None


class CollectiveEntry:
    """The way in of every collective request, all-reduce or other: the world its
    trainer agreed to, a plan (refused on the other members at once when this
    peer cannot make it, or they would wait for this one until their deadline),
    then the schedule run by the executor under its deadline, observed.
    ``local``: where several trainers of this node meet first."""

    def __init__(
        self,
        config: DaemonConfig,
        membership: PeerMembership,
        executor: Executor,
        buffers: SharedBuffers,
        local: LocalGroups,
        observer: CollectiveObserver,
        leaving: Callable[[], bool],
    ) -> None:
        self.config = config
        self.membership = membership
        self.executor = executor
        self.buffers = buffers
        self.local = local
        self.observer = observer
        self.leaving = leaving

    async def _enter(
        self,
        what: str,
        epoch: int | None,
        tag: Tag,
        timeout_s: float | None,
        plan: Callable[[WorldView, int], Planned],
    ) -> tuple[int, Tag]:
        """Run collective ``tag`` (``what``, for metrics and messages) as ``plan``
        makes it for this rank of the world of ``epoch``; its key ``(epoch, tag)``."""
        if self.leaving():
            raise DaemonUnavailable(f"daemon {self.config.peer_id} is leaving")
        world, rank = self.membership.agreed(epoch)
        key = (world.epoch, tag)
        try:
            planned = plan(world, rank)
        except CollnetError as exc:
            self.executor.refuse(key, world, exc)
            raise
        timeout_s = timeout_s or self.config.collective_timeout_s
        with self.observer.collective(
            what, key, planned.algo, planned.codec, planned.nbytes, world.size
        ):
            try:
                await self.executor.run(
                    key, world, rank, planned.schedule, planned.digest, timeout_s, what
                )
            except CollnetError as exc:
                if planned.modifies is None:
                    raise
                raise exc.with_buffer_modified(planned.modifies) from None
        return key


class AllReduces(CollectiveEntry):
    """This daemon's all-reduce requests; see the module docstring."""

    async def handle(self, req: AllReduce) -> None:
        if req.local_size == 1:
            await self.run(req)
        else:
            await self._run_local(req)

    def refuse(self, exc: InvalidArgument) -> None:
        """A request refused before it was parsed whole: if it named its collective
        (``tag``, maybe ``epoch``) in a world this peer is in, the other members
        are told now."""
        tag = exc.fields.get("tag")
        if not isinstance(tag, int | str) or isinstance(tag, bool):
            return
        epoch = exc.fields.get("epoch")
        try:
            world, _ = self.membership.agreed(epoch if isinstance(epoch, int) else None)
        except CollnetError:
            return
        self.executor.refuse((world.epoch, tag), world, exc)

    async def run(self, req: AllReduce, array: npt.NDArray[Any] | None = None) -> None:
        """All-reduce the tensor ``req`` names (or ``array`` in its place), in place."""
        started = time.perf_counter()
        key = await self._enter(
            "all_reduce",
            req.epoch,
            req.tag,
            req.timeout_s,
            lambda world, rank: self._plan(req, world, rank, array),
        )
        log.debug(
            "all_reduce %s: %s x %s in %.3f ms",
            key,
            req.count,
            req.dtype,
            (time.perf_counter() - started) * 1e3,
        )

    def _array(self, req: AllReduce) -> npt.NDArray[Any]:
        return self.buffers.array(req.shm, DTYPE_BY_NAME[req.dtype], req.count, req.offset)

    def _plan(
        self,
        req: AllReduce,
        world: WorldView,
        rank: int,
        array: npt.NDArray[Any] | None,
    ) -> Planned:
        """The schedule of ``req``, its digest and the algorithm chosen."""
        if array is None:
            array = self._array(req)
        codec = get_codec(req.codec, block_size=self.config.codec_block_size)
        schedule = make_all_reduce(
            req.algo,
            rank,
            world.size,
            array,
            req.reduction,
            codec=None if codec.name == "none" else codec,
            chunk_bytes=self.config.chunk_bytes,
            star_max_bytes=self.config.star_max_bytes,
            costs=world.costs,
        )
        # Peers must agree on everything that shapes the messages.
        digest = xxhash.xxh32_intdigest(
            f"{array.size}|{array.dtype.name}|{req.reduction}|{codec.name}|{req.algo}|"
            f"{self.config.chunk_bytes}|{self.config.codec_block_size}|"
            f"{self.config.star_max_bytes}|{req.retry_of!r}".encode()
        )
        nbytes = req.count * DTYPE_BY_NAME[req.dtype].itemsize
        return Planned(schedule, digest, schedule.algorithm, req.codec, nbytes)

    async def _run_local(self, req: AllReduce) -> None:
        """All-reduce of ``req.local_size`` trainers of this node: reduced here, then
        once over the network, the result copied back to each of them."""
        world, _ = self.membership.agreed(req.epoch)

        async def action(reqs: list[AllReduce]) -> None:
            try:
                shapes = {(r.count, r.dtype, r.reduction, r.codec, r.algo) for r in reqs}
                if len(shapes) != 1:
                    raise MismatchError(
                        f"this node's trainers disagree on all_reduce {req.tag!r} (count, "
                        f"dtype, op, codec or algorithm): {sorted(map(str, shapes))[:4]}"
                    )
                arrays = [self._array(r) for r in reqs]
                check_op(reqs[0].reduction, arrays[0].dtype)
            except CollnetError as exc:
                # The other nodes would otherwise wait for this one until their deadline.
                self.executor.refuse((world.epoch, req.tag), world, exc)
                raise
            acc = reduce_locally(reqs[0].reduction, arrays)
            try:
                await self.run(reqs[0], array=acc)
            except CollnetError as exc:
                raise exc.with_buffer_modified(False) from None  # only the node's copy
            for arr in arrays:
                np.copyto(arr, acc)

        timeout_s = req.timeout_s or self.config.collective_timeout_s
        await self.local.run(
            ("all_reduce", world.epoch, req.tag), req.local_size, req, action, timeout_s
        )
