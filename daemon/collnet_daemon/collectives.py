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

Several trainers per daemon (``local_size`` > 1, the same on every node)
meet in a local group first (``localgroup``), and their node runs one
collective over the network for all of them. Trainer ``l`` of node ``d`` is
rank ``d * L + l`` of ``W * L``, so a node's trainers own consecutive blocks:

- broadcast from rank ``r``: node ``r // L`` sends trainer ``r % L``'s
  tensor, and every node copies what it holds into its other trainers';
- all-gather (equal or variable): each node's trainers' inputs go into its
  first trainer's output, the node's block being the union of theirs; the
  gathered output is then copied to the others (an ``all_gather_v``'s counts
  phase gathers ``L`` counts per node);
- reduce-scatter: the trainers' inputs are reduced here (``reduce_locally``;
  ``avg`` is then the mean of equal-sized nodes' means), the node owns the
  union of its trainers' blocks, and each trainer gets its own;
- barrier: one network barrier once every local trainer has entered.

The trainers must agree on the request (``MismatchError`` otherwise, refused
on the other nodes at once) and name each local rank once; ``L`` is in the
digest, so nodes that run different ``L`` fail with ``MismatchError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
import xxhash

from collnet.algo.actions import Schedule
from collnet.algo.allgather import RingAllGather, all_gather_equal
from collnet.algo.barrier import DisseminationBarrier
from collnet.algo.ops import DTYPE_BY_NAME, check_op
from collnet.algo.reducescatter import RingReduceScatter, output_range
from collnet.algo.select import make_broadcast
from collnet.codec.base import Codec
from collnet.codec.registry import get_codec
from collnet.errors import CollnetError, InvalidArgument, MismatchError
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
from collnet.wire.fields import Tag
from collnet_daemon.allreduce import CollectiveEntry, Planned
from collnet_daemon.localgroup import reduce_locally


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
        if req.local_size == 1:
            return await self._run([req])
        what, tag = _phase(req)
        world, _ = self.membership.agreed(req.epoch)

        async def action(reqs: list[CollectiveRequest]) -> dict[str, Any]:
            try:
                group = _local_group(reqs)
            except CollnetError as exc:
                # The other nodes would otherwise wait for this one until their deadline.
                self.executor.refuse((world.epoch, tag), world, exc)
                raise
            return await self._run(group)

        timeout_s = req.timeout_s or self.config.collective_timeout_s
        key = (what, world.epoch, tag)
        return await self.local.run(key, req.local_size, req, action, timeout_s)

    async def _run(self, reqs: list[CollectiveRequest]) -> dict[str, Any]:
        """Run the collective of this node's trainers ``reqs`` (in local rank order)."""
        req = reqs[0]
        what, tag = _phase(req)
        after: Callable[[], dict[str, Any]] = dict

        def plan(world: WorldView, rank: int) -> Planned:
            nonlocal after
            made = self._plan(reqs, world, rank)
            after = made.after
            local = f"|L{len(reqs)}" if len(reqs) > 1 else ""
            digest = xxhash.xxh32_intdigest(
                f"{made.shape}{local}|{self.config.chunk_bytes}|{self.config.codec_block_size}|"
                f"{self.config.star_max_bytes}".encode()
            )
            return Planned(made.schedule, digest, made.algo, made.codec, made.nbytes, made.modifies)

        await self._enter(what, req.epoch, tag, req.timeout_s, plan)
        return after()

    # -- planning ------------------------------------------------------------
    def _plan(self, reqs: list[CollectiveRequest], world: WorldView, rank: int) -> _Plan:
        req = reqs[0]
        if isinstance(req, Barrier):
            return _Plan(DisseminationBarrier(rank, world.size), "barrier", "dissemination", "", 0)
        codec = get_codec(req.codec, block_size=self.config.codec_block_size)
        quantizer = None if codec.name == "none" else codec
        if isinstance(req, Broadcast):
            return self._broadcast(_same(reqs, Broadcast), world, rank, quantizer)
        if isinstance(req, AllGather):
            return self._all_gather(_same(reqs, AllGather), world, rank, quantizer)
        if isinstance(req, AllGatherV):
            if req.counts is None:
                return self._counts(_same(reqs, AllGatherV), world, rank)
            return self._all_gather_v(_same(reqs, AllGatherV), world, rank, quantizer)
        return self._reduce_scatter(_same(reqs, ReduceScatter), world, rank, quantizer)

    def _array(self, shm: str, dtype: str, count: int, offset: int) -> npt.NDArray[Any]:
        return self.buffers.array(shm, DTYPE_BY_NAME[dtype], count, offset)

    def _input(self, req: Broadcast | AllGather | AllGatherV | ReduceScatter) -> npt.NDArray[Any]:
        return self._array(req.shm, req.dtype, req.count, req.offset)

    def _broadcast(
        self, reqs: list[Broadcast], world: WorldView, rank: int, codec: Codec | None
    ) -> _Plan:
        req, local = reqs[0], len(reqs)
        if not 0 <= req.root < world.size * local:
            raise InvalidArgument(
                f"broadcast root {req.root} is not a rank of {world.size * local}", tag=req.tag
            )
        root_node, root_trainer = divmod(req.root, local)
        bufs = [self._input(r) for r in reqs]
        buf = bufs[root_trainer] if rank == root_node else bufs[0]
        schedule = make_broadcast(
            req.algo,
            rank,
            world.size,
            buf,
            root_node,
            codec,
            self.config.chunk_bytes,
            self.config.star_max_bytes,
        )
        shape = f"broadcast|{req.count}|{req.dtype}|{req.root}|{req.codec}|{req.algo}"
        return _Plan(
            schedule, shape, schedule.algorithm, req.codec, buf.nbytes, after=_copy(buf, bufs)
        )

    def _gather_into(
        self,
        reqs: list[AllGather] | list[AllGatherV],
        out_count: int,
        start: int,
    ) -> tuple[npt.NDArray[Any], list[npt.NDArray[Any]]]:
        """The first trainer's output with every local trainer's input copied into its
        block (from ``start``, in local rank order), and all the trainers' outputs."""
        outs = []
        for r in reqs:
            assert r.out_shm is not None
            outs.append(self._array(r.out_shm, r.dtype, out_count, r.out_offset))
        out = outs[0]
        for r in reqs:
            block = out[start : start + r.count]
            src = self._input(r)
            if r.count and src.ctypes.data != block.ctypes.data:
                np.copyto(block, src)
            start += r.count
        return out, outs

    def _all_gather(
        self, reqs: list[AllGather], world: WorldView, rank: int, codec: Codec | None
    ) -> _Plan:
        req, local = reqs[0], len(reqs)
        out, outs = self._gather_into(
            reqs, req.count * world.size * local, rank * local * req.count
        )
        schedule = all_gather_equal(rank, world.size, out, codec, self.config.chunk_bytes)
        shape = f"all_gather|{req.count}|{req.dtype}|{req.codec}"
        return _Plan(schedule, shape, "ring", req.codec, out.nbytes, after=_copy(out, outs))

    def _counts(self, reqs: list[AllGatherV], world: WorldView, rank: int) -> _Plan:
        local = len(reqs)
        counts = np.zeros(world.size * local, dtype=np.int64)
        counts[rank * local : (rank + 1) * local] = [r.count for r in reqs]
        schedule = all_gather_equal(rank, world.size, counts)
        # dtype and codec too: peers that disagree fail here, before any data moves.
        shape = f"all_gather_v-counts|{reqs[0].dtype}|{reqs[0].codec}"
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
        self, reqs: list[AllGatherV], world: WorldView, rank: int, codec: Codec | None
    ) -> _Plan:
        req, local = reqs[0], len(reqs)
        counts = req.counts
        assert counts is not None
        first = rank * local
        if len(counts) != world.size * local or any(
            counts[first + k] != r.count for k, r in enumerate(reqs)
        ):
            raise InvalidArgument(
                f"all_gather_v {req.tag!r}: counts {list(counts)[:8]} do not fit ranks "
                f"{first}..{first + local - 1} of {world.size * local} contributing "
                f"{[r.count for r in reqs][:8]}",
                tag=req.tag,
            )
        nodes = [sum(counts[d * local : (d + 1) * local]) for d in range(world.size)]
        out, outs = self._gather_into(reqs, sum(counts), sum(counts[:first]))
        schedule = RingAllGather(rank, world.size, out, nodes, codec, self.config.chunk_bytes)
        shape = f"all_gather_v|{','.join(map(str, counts))}|{req.dtype}|{req.codec}"
        return _Plan(schedule, shape, "ring", req.codec, out.nbytes, after=_copy(out, outs))

    def _reduce_scatter(
        self, reqs: list[ReduceScatter], world: WorldView, rank: int, codec: Codec | None
    ) -> _Plan:
        req, local = reqs[0], len(reqs)
        ranges = [
            output_range(req.count, world.size * local, rank * local + k) for k in range(local)
        ]
        outs = [
            self._array(r.out_shm, r.dtype, stop - start, r.out_offset)
            for r, (start, stop) in zip(reqs, ranges, strict=True)
        ]
        inputs = [self._input(r) for r in reqs]
        check_op(req.reduction, inputs[0].dtype)  # before the local reduction uses it
        # The ring leaves partial sums outside this rank's block: never in an input.
        scratch = reduce_locally(req.reduction, inputs)
        counts = None
        if local > 1:  # this node owns its trainers' consecutive blocks
            counts = [
                output_range(req.count, world.size * local, (d + 1) * local - 1)[1]
                - output_range(req.count, world.size * local, d * local)[0]
                for d in range(world.size)
            ]
        schedule = RingReduceScatter(
            rank, world.size, scratch, req.reduction, codec, self.config.chunk_bytes, counts
        )

        def copy_out() -> dict[str, Any]:
            for out, (start, stop) in zip(outs, ranges, strict=True):
                np.copyto(out, scratch[start:stop])
            return {}

        shape = f"reduce_scatter|{req.count}|{req.dtype}|{req.reduction}|{req.codec}"
        return _Plan(
            schedule, shape, "ring", req.codec, scratch.nbytes, after=copy_out, modifies=False
        )


R = TypeVar("R", Broadcast, AllGather, AllGatherV, ReduceScatter)


def _same(reqs: list[CollectiveRequest], kind: type[R]) -> list[R]:
    """``reqs`` as the one kind ``_local_group`` found them to be (their first's)."""
    return cast(list[R], reqs)


def _phase(req: CollectiveRequest) -> tuple[str, Tag]:
    """What runs over the network for ``req`` (an ``all_gather_v``'s counts phase
    apart from its data) and under which tag."""
    if isinstance(req, AllGatherV) and req.counts is None:
        return f"{req.KIND}-counts", counts_tag(req.tag)
    return req.KIND, req.tag


def _copy(src: npt.NDArray[Any], dsts: list[npt.NDArray[Any]]) -> Callable[[], dict[str, Any]]:
    """After success: ``src`` into every other trainer's buffer of ``dsts``."""

    def copy() -> dict[str, Any]:
        for dst in dsts:
            if dst.ctypes.data != src.ctypes.data:
                np.copyto(dst, src)
        return {}

    return copy


def _agreed_fields(req: CollectiveRequest) -> tuple[Any, ...]:
    """What a node's trainers must agree on: all but their tensors and local rank
    (and, in an ``all_gather_v``'s counts phase, their own counts)."""
    if isinstance(req, Barrier):
        return (req.KIND,)
    fields: tuple[Any, ...] = (req.KIND, req.dtype, req.codec)
    if isinstance(req, Broadcast):
        return (*fields, req.count, req.root, req.algo)
    if isinstance(req, AllGather):
        return (*fields, req.count)
    if isinstance(req, AllGatherV):
        return (*fields, req.counts)
    return (*fields, req.count, req.reduction)


def _local_group(reqs: list[CollectiveRequest]) -> list[CollectiveRequest]:
    """This node's trainers' requests in local rank order, checked to agree."""
    local = len(reqs)
    ranks = sorted(r.local_rank for r in reqs)
    if ranks != list(range(local)):
        raise MismatchError(
            f"this node's {local} trainers of {reqs[0].KIND} {reqs[0].tag!r} name local ranks "
            f"{ranks[:8]}: each of 0..{local - 1} must be named once"
        )
    shapes = {_agreed_fields(r) for r in reqs}
    if len(shapes) != 1:
        raise MismatchError(
            f"this node's trainers disagree on {reqs[0].KIND} {reqs[0].tag!r}: "
            f"{sorted(map(str, shapes))[:4]}"
        )
    return sorted(reqs, key=lambda r: r.local_rank)
