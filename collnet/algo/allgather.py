"""Ring all-gather, equal or variable sizes: the ring all-reduce's second phase alone.

Rank ``k`` contributes ``counts[k]`` elements (every rank passes the same
``counts``; the equal-size form is ``counts = [count] * W``). The output
``out`` holds all contributions in rank order, ``sum(counts)`` elements:
block ``k`` is ``out[offset_k : offset_k + counts[k]]`` with ``offset_k =
sum(counts[:k])``. The contribution is taken in place: rank ``r`` writes its
own data into its block of ``out`` before it builds the schedule (the way
``all_gather_into_tensor`` may pass a view of its output as its input), so
nothing is copied locally.

This is ``RingSchedule`` with only its all-gather phase over those blocks
(``partition.Blocks``): at step ``s`` in ``0 .. W - 2`` rank ``r`` sends
block ``(r - s) % W`` to ``r + 1`` and receives block ``(r - s - 1) % W``
from ``r - 1``, chunk by chunk, forwarding each chunk as soon as it has
arrived. Received bytes land straight in ``out`` (raw path) and are
forwarded as views of it; no block is written after it was sent.

With a quantizing codec (float dtypes only) each rank encodes its own block
once, replaces its copy with the decode of those bytes, and every other rank
decodes the very same bytes, forwarded unchanged: all ranks end with
bit-identical outputs, the owner's block included.

Failure model as the ring's: a lost peer aborts with ``PeerLost`` naming the
step (phase ``all-gather``); after an abort ``out`` is undefined except for
this rank's own block on the raw path.

Agreement: block ``k`` travels ``k -> k + 1 -> ... -> k - 1``, so when every
block holds data each rank has, through the ring, heard from every rank. An
empty block travels nowhere: the rank before its owner (and a rank with
nothing to receive at all) completes without word from some ranks, so with
any empty block ``needs_agreement`` is True (``Schedule``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy.typing as npt

from collnet.algo.partition import Blocks, check_group, chunk_elems_for
from collnet.algo.reducer import check_tensor
from collnet.algo.ring import RingSchedule
from collnet.codec.base import Codec
from collnet.errors import InvalidArgument


class RingAllGather(RingSchedule):
    """Ring all-gather into ``out`` of blocks of ``counts`` elements, seen from ``rank``.

    ``out``: 1-D contiguous writable array of ``sum(counts)`` elements of any
    numeric dtype (float32, float16 or bfloat16 with a quantizing codec);
    rank ``rank``'s block holds its contribution when the schedule is built and all
    blocks hold everyone's after ``Complete``. ``counts``: one block size per
    rank, the same on every rank. ``codec`` and ``chunk_bytes`` as for
    ``RingAllReduce``.
    """

    collective = "all-gather"

    def __init__(
        self,
        rank: int,
        world: int,
        out: npt.NDArray[Any],
        counts: Sequence[int],
        codec: Codec | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        check_group(rank, world)
        check_tensor(out)
        if len(counts) != world:
            raise InvalidArgument(
                f"all-gather needs one count per rank: {len(counts)} counts for world {world}",
                world=world,
            )
        blocks = Blocks(tuple(int(c) for c in counts), chunk_elems_for(chunk_bytes, out.itemsize))
        if blocks.n != out.shape[0]:
            raise InvalidArgument(
                f"all-gather output holds {out.shape[0]} elements, counts sum to {blocks.n}",
                n=int(out.shape[0]),
            )
        super().__init__(
            rank, world, out, None, codec, chunk_bytes, reduce=False, gather=True, layout=blocks
        )

    @property
    def needs_agreement(self) -> bool:
        # The counts are the same on every rank (the digest covers them).
        return min(self._part.num_chunks(k) for k in range(self.world)) == 0

    @property
    def own_range(self) -> tuple[int, int]:
        """``(start, stop)`` of this rank's block of ``out``."""
        return self._part.segment(self.rank)


def all_gather_equal(
    rank: int,
    world: int,
    out: npt.NDArray[Any],
    codec: Codec | None = None,
    chunk_bytes: int = 1 << 20,
) -> RingAllGather:
    """The equal-size all-gather: ``out`` holds ``world * count`` elements, rank ``k``'s
    block at ``[k * count, (k + 1) * count)``."""
    check_group(rank, world)
    check_tensor(out)
    count, rem = divmod(int(out.shape[0]), world)
    if rem:
        raise InvalidArgument(
            f"equal-size all-gather output of {out.shape[0]} elements is not a multiple of "
            f"world {world}",
            n=int(out.shape[0]),
            world=world,
        )
    return RingAllGather(rank, world, out, [count] * world, codec, chunk_bytes)
