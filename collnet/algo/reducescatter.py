"""Ring reduce-scatter: the ring all-reduce's first phase alone.

Every rank passes the whole tensor ``buf`` (``n`` elements, the same ``n``
everywhere). The tensor is cut like the all-reduce's (``partition``,
exactly ``np.array_split(range(n), W)``): segment ``k`` is
``[k*q + min(k, rem), ...)`` with ``q, rem = divmod(n, W)``, so the first
``rem`` ranks own ``q + 1`` elements and the others ``q``. After
``Complete``, ``buf[output_range]`` on rank ``r`` holds the reduction (sum,
avg, min, max or prod) of segment ``r`` over every rank; the rest of ``buf``
holds partial sums and is undefined.

This is ``RingSchedule`` with only its reduce-scatter phase and the segments
shifted by one, so the segment a rank finishes with is its own: ``W - 1``
steps, each rank sending ``(W - 1) / W`` of the tensor. Messages, zero-copy
and failure model are the ring's (see ``ring``); a lost peer aborts with
``PeerLost`` naming the step, in phase ``reduce-scatter``.

With a quantizing codec every hop carries the encoded partial result of a
chunk (float32 accumulation, as in the all-reduce); the owner's result is
never re-encoded, since no other rank receives it. The ranks' outputs are
disjoint, so there is nothing for them to agree on bit for bit.

Agreement: segment ``k`` travels ``k + 1 -> ... -> k``, so a rank whose own
segment holds data has, through the ring, heard from every rank. With fewer
elements than ranks the last ``W - n`` segments are empty and their owners
complete without word from some ranks: ``needs_agreement`` is True then
(``Schedule``).

``counts`` replaces the equal segments with given blocks (rank ``k`` owns
``counts[k]`` consecutive elements): a node whose trainers own several
consecutive blocks of a larger reduce-scatter owns their union.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy.typing as npt

from collnet.algo.partition import Blocks, Partition, chunk_elems_for
from collnet.algo.ring import RingSchedule
from collnet.codec.base import Codec


class RingReduceScatter(RingSchedule):
    """Ring reduce-scatter of ``buf`` in place, seen from ``rank``.

    Arguments as for ``RingAllReduce``; the result is ``buf[output_range]``.
    ``counts``: each rank's block size (they sum to ``buf``'s length), if not
    ``output_range``'s equal split.
    """

    collective = "reduce-scatter"

    def __init__(
        self,
        rank: int,
        world: int,
        buf: npt.NDArray[Any],
        op: str,
        codec: Codec | None = None,
        chunk_bytes: int = 1 << 20,
        counts: Sequence[int] | None = None,
    ) -> None:
        layout = None
        if counts is not None:
            layout = Blocks(
                tuple(int(c) for c in counts), chunk_elems_for(chunk_bytes, buf.itemsize)
            )
        super().__init__(
            rank,
            world,
            buf,
            op,
            codec,
            chunk_bytes,
            reduce=True,
            gather=False,
            shift=-1,
            layout=layout,
        )

    @property
    def needs_agreement(self) -> bool:
        # An empty block's owner completes without word from some ranks. The
        # layout is the same on every rank (the digest covers it).
        return any(self._part.num_chunks(k) == 0 for k in range(self.world))

    @property
    def output_range(self) -> tuple[int, int]:
        """``(start, stop)`` of the elements of ``buf`` this rank owns."""
        return self._part.segment(self.rank)


def output_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of block ``rank`` of an ``n``-element reduce-scatter among
    ``world`` ranks: ``n // world`` elements each, the first ``n % world`` blocks
    one more (``np.array_split``'s layout; torch's when ``world`` divides ``n``)."""
    return Partition(n, world, 1).segment(rank)
