"""How a flat tensor of ``n`` elements is cut into segments and chunks.

Every rank of a collective computes the same partition from the same
``(n, world, chunk_elems)``, which is what lets a message be named by
``(step, chunk)`` alone.

Invariants:

- the ``world`` segments tile ``[0, n)`` in order; their sizes differ by at
  most one and the larger ones come first (exactly ``np.array_split``);
- a segment of ``size`` elements has ``ceil(size / chunk_elems)`` chunks,
  each of ``chunk_elems`` elements except a shorter last one, so no chunk
  is empty and an empty segment has no chunks at all;
- every lookup is O(1) arithmetic: nothing proportional to ``n`` is stored.

``Blocks`` is the same interface over blocks of given sizes (the
variable-size all-gather: block ``k`` is rank ``k``'s contribution, in rank
order); it stores the ``world`` offsets, nothing proportional to ``n``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from collnet.errors import InvalidArgument


def check_group(rank: int, world: int) -> None:
    """Raise ``InvalidArgument`` unless ``0 <= rank < world``."""
    if world < 1:
        raise InvalidArgument(f"world must be >= 1, got {world}", world=world)
    if not 0 <= rank < world:
        raise InvalidArgument(f"rank {rank} outside world of {world}", rank=rank, world=world)


def chunk_elems_for(chunk_bytes: int, itemsize: int) -> int:
    """Elements per chunk for a byte budget: at least one element."""
    if chunk_bytes < 1:
        raise InvalidArgument(
            f"chunk_bytes must be >= 1, got {chunk_bytes}", chunk_bytes=chunk_bytes
        )
    return max(1, chunk_bytes // itemsize)


@dataclass(frozen=True, slots=True)
class Partition:
    """Segments of ``[0, n)`` for ``world`` ranks, each cut into chunks."""

    n: int
    world: int
    chunk_elems: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise InvalidArgument(f"n must be >= 0, got {self.n}", n=self.n)
        if self.world < 1:
            raise InvalidArgument(f"world must be >= 1, got {self.world}", world=self.world)
        if self.chunk_elems < 1:
            raise InvalidArgument(
                f"chunk_elems must be >= 1, got {self.chunk_elems}", chunk_elems=self.chunk_elems
            )

    def segment(self, k: int) -> tuple[int, int]:
        """``(start, stop)`` of segment ``k``."""
        q, rem = divmod(self.n, self.world)
        start = k * q + min(k, rem)
        return start, start + q + (1 if k < rem else 0)

    def num_chunks(self, k: int) -> int:
        """How many chunks segment ``k`` has (0 when it is empty)."""
        start, stop = self.segment(k)
        return -(-(stop - start) // self.chunk_elems)

    def max_chunks(self) -> int:
        """The largest chunk count of any segment (that of segment 0)."""
        return self.num_chunks(0)

    def chunk(self, k: int, c: int) -> tuple[int, int]:
        """``(start, stop)`` of chunk ``c`` of segment ``k``; the caller checks ``c``."""
        seg_start, seg_stop = self.segment(k)
        start = seg_start + c * self.chunk_elems
        return start, min(seg_stop, start + self.chunk_elems)


@dataclass(frozen=True, slots=True)
class Blocks:
    """``[0, sum(counts))`` cut into consecutive blocks of ``counts[k]`` elements,
    each cut into chunks like a ``Partition`` segment."""

    counts: tuple[int, ...]
    chunk_elems: int
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.counts:
            raise InvalidArgument("counts must name at least one block")
        if any(c < 0 for c in self.counts):
            raise InvalidArgument(f"counts must be >= 0, got {list(self.counts)}")
        if self.chunk_elems < 1:
            raise InvalidArgument(
                f"chunk_elems must be >= 1, got {self.chunk_elems}", chunk_elems=self.chunk_elems
            )
        object.__setattr__(self, "offsets", tuple(itertools.accumulate(self.counts, initial=0)))

    @property
    def n(self) -> int:
        return self.offsets[-1]

    @property
    def world(self) -> int:
        return len(self.counts)

    def segment(self, k: int) -> tuple[int, int]:
        """``(start, stop)`` of block ``k``."""
        return self.offsets[k], self.offsets[k + 1]

    def num_chunks(self, k: int) -> int:
        """How many chunks block ``k`` has (0 when it is empty)."""
        return -(-self.counts[k] // self.chunk_elems)

    def max_chunks(self) -> int:
        """The largest chunk count of any block."""
        return -(-max(self.counts) // self.chunk_elems)

    def chunk(self, k: int, c: int) -> tuple[int, int]:
        """``(start, stop)`` of chunk ``c`` of block ``k``; the caller checks ``c``."""
        start = self.offsets[k] + c * self.chunk_elems
        return start, min(self.offsets[k + 1], start + self.chunk_elems)


Layout = Partition | Blocks
"""What the ring walks: equal segments (all-reduce, reduce-scatter) or given blocks."""


def segment_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """The ``world`` segments of ``[0, n)`` as ``(start, stop)`` pairs."""
    part = Partition(n, world, 1)
    return [part.segment(k) for k in range(world)]


def chunk_bounds(start: int, stop: int, chunk_elems: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into chunks of at most ``chunk_elems`` elements."""
    if chunk_elems < 1:
        raise InvalidArgument(
            f"chunk_elems must be >= 1, got {chunk_elems}", chunk_elems=chunk_elems
        )
    return [(a, min(stop, a + chunk_elems)) for a in range(start, stop, chunk_elems)]
