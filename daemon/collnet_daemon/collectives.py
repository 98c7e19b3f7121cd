"""Broadcast, all-gather (equal and variable sizes), reduce-scatter and barrier requests.

Each request becomes one of ``collnet.algo``'s schedules, run by the executor
like an all-reduce (``allreduce``), with the same guarantees:

- it runs in the world of the epoch its trainer agreed to, as collective
  ``(epoch, tag)``; the digest every DATA piece carries covers everything that
  shapes the messages (kind, counts, dtype, root, op, codec, algorithm, chunk
  and block sizes), so peers that disagree fail with ``MismatchError``;
- a request this peer refuses (a bad root, a tensor it cannot map, counts
  that do not fit) is refused on the other members at once;
- a lost peer fails the collective on every survivor with ``PeerLost``
  naming the step, a deadline with ``Timeout``.

Buffers: a broadcast works in the caller's tensor; an all-gather copies this
rank's input into its block of the caller's output first (unless it lies
there already) and gathers in place; a reduce-scatter reduces a private copy
of the input (the ring leaves partial sums behind) and copies only this
rank's block out, so neither the input nor, on failure, the output is
touched. ``all_gather_v``'s counts phase gathers every rank's count (an
equal all-gather of one int64 each, under ``counts_tag(tag)``) and replies
with them; its data phase is a variable-size all-gather.

Several trainers per daemon (``local_size`` > 1) are refused with
``InvalidArgument`` on every member: only the all-reduce and ``sync_state``
meet in local groups so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from collnet.algo.actions import Schedule
from collnet.algo.allgather import RingAllGather, all_gather_equal
from collnet.algo.barrier import DisseminationBarrier
from collnet.algo.ops import DTYPE_BY_NAME
from collnet.algo.reducescatter import RingReduceScatter, output_range
from collnet.algo.select import make_broadcast
from collnet.codec.base import Codec
from collnet.codec.registry import get_codec
from collnet.errors import InvalidArgument
from collnet.membership.world import WorldView
from collnet.wire.collectives import (
    AllGather,
    AllGatherV,
    Barrier,
    Broadcast,
    CollectiveRequest,
    ReduceScatter,
    counts_tag,
)
from collnet_daemon.allreduce import CollectiveEntry, Planned


@dataclass
class _Plan:
    """One request made ready to run: its schedule and what to do around it."""

    schedule: Schedule
    shape: str  # everything that shapes the messages, hashed into the digest
    algo: str
    codec: str
    nbytes: int
    # Runs after success; its value is the reply.
    after: Callable[[], dict[str, Any]] = field(default=lambda: {})
    # Whether a failure may have left partial data in the caller's buffers.
    modifies: bool = True


class Collectives(CollectiveEntry):
    """This daemon's broadcast, all-gather, reduce-scatter and barrier requests."""

    async def handle(self, req: CollectiveRequest) -> dict[str, Any]:
        """Run ``req`` as its collective; the reply (empty but for a counts phase)."""
        counts_phase = isinstance(req, AllGatherV) and req.counts is None
        tag = counts_tag(req.tag) if counts_phase else req.tag
        after: Callable[[], dict[str, Any]] = dict

        def plan(world: WorldView, rank: int) -> Planned:
            nonlocal after
            made = self._plan(req, world, rank)
            after = made.after
            digest = xxhash.xxh32_intdigest(
                f"{made.shape}|{self.config.chunk_bytes}|{self.config.codec_block_size}|"
                f"{self.config.star_max_bytes}".encode()
            )
            return Planned(made.schedule, digest, made.algo, made.codec, made.nbytes, made.modifies)

        what = req.KIND + ("-counts" if counts_phase else "")
        await self._enter(what, req.epoch, tag, req.timeout_s, plan)
        return after()

    # -- planning ------------------------------------------------------------
    def _plan(self, req: CollectiveRequest, world: WorldView, rank: int) -> _Plan:
        if req.local_size != 1:
            raise InvalidArgument(
                f"{req.KIND} with local_size {req.local_size}: several trainers per daemon "
                "are supported by all_reduce and sync_state only; run one trainer per daemon",
                tag=req.tag,
            )
        if isinstance(req, Barrier):
            return _Plan(DisseminationBarrier(rank, world.size), "barrier", "dissemination", "", 0)
        codec = get_codec(req.codec, block_size=self.config.codec_block_size)
        quantizer = None if codec.name == "none" else codec
        if isinstance(req, Broadcast):
            return self._broadcast(req, world, rank, quantizer)
        if isinstance(req, AllGather):
            return self._all_gather(req, world, rank, quantizer)
        if isinstance(req, AllGatherV):
            if req.counts is None:
                return self._counts(req, world, rank)
            return self._all_gather_v(req, world, rank, quantizer)
        return self._reduce_scatter(req, world, rank, quantizer)

    def _array(self, shm: str, dtype: str, count: int, offset: int) -> npt.NDArray[Any]:
        return self.buffers.array(shm, DTYPE_BY_NAME[dtype], count, offset)

    def _broadcast(self, req: Broadcast, world: WorldView, rank: int, codec: Codec | None) -> _Plan:
        buf = self._array(req.shm, req.dtype, req.count, req.offset)
        schedule = make_broadcast(
            req.algo,
            rank,
            world.size,
            buf,
            req.root,
            codec,
            self.config.chunk_bytes,
            self.config.star_max_bytes,
        )
        shape = f"broadcast|{req.count}|{req.dtype}|{req.root}|{req.codec}|{req.algo}"
        return _Plan(schedule, shape, schedule.algorithm, req.codec, buf.nbytes)

    def _gather_into(
        self,
        req: AllGather | AllGatherV,
        out_count: int,
        start: int,
    ) -> npt.NDArray[Any]:
        """The caller's output, with this rank's input copied into its block."""
        assert req.out_shm is not None
        out = self._array(req.out_shm, req.dtype, out_count, req.out_offset)
        block = out[start : start + req.count]
        src = self._array(req.shm, req.dtype, req.count, req.offset)
        if req.count and src.ctypes.data != block.ctypes.data:
            np.copyto(block, src)
        return out

    def _all_gather(
        self, req: AllGather, world: WorldView, rank: int, codec: Codec | None
    ) -> _Plan:
        out = self._gather_into(req, req.count * world.size, rank * req.count)
        schedule = all_gather_equal(rank, world.size, out, codec, self.config.chunk_bytes)
        shape = f"all_gather|{req.count}|{req.dtype}|{req.codec}"
        return _Plan(schedule, shape, "ring", req.codec, out.nbytes)

    def _counts(self, req: AllGatherV, world: WorldView, rank: int) -> _Plan:
        counts = np.zeros(world.size, dtype=np.int64)
        counts[rank] = req.count
        schedule = all_gather_equal(rank, world.size, counts)
        # dtype and codec too: peers that disagree fail here, before any data moves.
        shape = f"all_gather_v-counts|{req.dtype}|{req.codec}"
        return _Plan(
            schedule,
            shape,
            "ring",
            "none",
            counts.nbytes,
            after=lambda: {"counts": [int(c) for c in counts]},
            modifies=False,
        )

    def _all_gather_v(
        self, req: AllGatherV, world: WorldView, rank: int, codec: Codec | None
    ) -> _Plan:
        counts = req.counts
        assert counts is not None
        if len(counts) != world.size or counts[rank] != req.count:
            raise InvalidArgument(
                f"all_gather_v {req.tag!r}: counts {list(counts)[:8]} do not fit rank {rank} "
                f"of {world.size} contributing {req.count}",
                tag=req.tag,
            )
        out = self._gather_into(req, sum(counts), sum(counts[:rank]))
        schedule = RingAllGather(rank, world.size, out, counts, codec, self.config.chunk_bytes)
        shape = f"all_gather_v|{','.join(map(str, counts))}|{req.dtype}|{req.codec}"
        return _Plan(schedule, shape, "ring", req.codec, out.nbytes)

    def _reduce_scatter(
        self, req: ReduceScatter, world: WorldView, rank: int, codec: Codec | None
    ) -> _Plan:
        start, stop = output_range(req.count, world.size, rank)
        out = self._array(req.out_shm, req.dtype, stop - start, req.out_offset)
        # The ring leaves partial sums outside this rank's block: never in the input.
        scratch = np.array(self._array(req.shm, req.dtype, req.count, req.offset), copy=True)
        schedule = RingReduceScatter(
            rank, world.size, scratch, req.reduction, codec, self.config.chunk_bytes
        )

        def copy_out() -> dict[str, Any]:
            np.copyto(out, scratch[start:stop])
            return {}

        shape = f"reduce_scatter|{req.count}|{req.dtype}|{req.reduction}|{req.codec}"
        return _Plan(
            schedule, shape, "ring", req.codec, scratch.nbytes, after=copy_out, modifies=False
        )
