"""Streaming DiLoCo's fragments and their staggered schedule (pure: no torch, no I/O).

The model's parameters, in ``named_parameters()`` order, are cut into
``fragments`` contiguous groups whose sizes are as even as whole parameters
allow (the largest group is as small as possible). Fragment ``f`` is
synchronised every ``inner_steps`` steps, at the steps ``(f + 1) * interval``
modulo ``inner_steps``, ``interval = inner_steps // fragments``: one fragment
every ``interval`` steps, so every parameter crosses the network once per
``inner_steps`` steps, as in blocking DiLoCo, but in ``fragments`` smaller
bursts. A fragment's exchange started at step ``t`` is applied at
``t + overlap`` (``0 <= overlap <= interval``): at most one is in flight, and
it lands before the next one starts.

Every peer derives the same fragments from the same parameter sizes and the
same schedule from the synced sync counter, so they agree on which fragment
a sync carries without exchanging anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Fragment:
    """A contiguous group of parameters and where it lies in the flat weight vector."""

    index: int
    params: range  # indices into the model's parameter list
    start: int  # first element in the flat vector
    stop: int  # one past the last

    @property
    def size(self) -> int:
        return self.stop - self.start


def split(sizes: Sequence[int], fragments: int) -> list[Fragment]:
    """Cut parameters of ``sizes`` elements into ``fragments`` contiguous, non-empty groups.

    The largest group is the smallest any contiguous cut allows (binary search
    on that bound, greedy packing under it), so no burst is bigger than it
    must be.
    """
    if not 1 <= fragments <= len(sizes):
        raise ValueError(f"fragments must be in 1..{len(sizes)} (the parameters), got {fragments}")
    if any(s < 0 for s in sizes):
        raise ValueError("parameter sizes must be >= 0")
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if _groups_needed(sizes, mid) <= fragments:
            hi = mid
        else:
            lo = mid + 1
    return _pack(sizes, fragments, lo)


def _groups_needed(sizes: Sequence[int], bound: int) -> int:
    groups, load = 1, 0
    for s in sizes:
        if load + s > bound:
            groups, load = groups + 1, 0
        load += s
    return groups


def _pack(sizes: Sequence[int], fragments: int, bound: int) -> list[Fragment]:
    # Greedy under ``bound``, closing a group early when the parameters left are
    # only just enough to give every remaining group one: exactly ``fragments``.
    out: list[Fragment] = []
    first, start, load = 0, 0, 0
    for i, s in enumerate(sizes):
        left_after = len(sizes) - i
        groups_left = fragments - len(out)
        if i > first and (load + s > bound or left_after < groups_left):
            out.append(Fragment(len(out), range(first, i), start, start + load))
            first, start, load = i, start + load, 0
        load += s
    out.append(Fragment(len(out), range(first, len(sizes)), start, start + load))
    assert len(out) == fragments, (len(out), fragments)
    return out


@dataclass(frozen=True)
class Schedule:
    """When each fragment syncs and when its exchange is applied; see the module docstring.

    Blocking DiLoCo is the schedule with one fragment and ``overlap == 0``.
    """

    inner_steps: int
    fragments: int = 1
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError("inner_steps must be >= 1")
        if self.fragments < 1 or self.inner_steps % self.fragments:
            raise ValueError(
                f"fragments ({self.fragments}) must divide inner_steps ({self.inner_steps})"
            )
        if not 0 <= self.overlap <= self.interval:
            raise ValueError(f"overlap must be in 0..{self.interval} (inner_steps / fragments)")

    @property
    def interval(self) -> int:
        """Inner steps between two syncs (of consecutive fragments)."""
        return self.inner_steps // self.fragments

    def fragment_at(self, inner_step: int) -> int | None:
        """The fragment whose sync falls at this inner step (counted from 1), if any."""
        if inner_step < 1 or inner_step % self.interval:
            return None
        return self.fragment_of(inner_step // self.interval - 1)

    def fragment_of(self, sync: int) -> int:
        """The fragment carried by the sync numbered ``sync`` (from 0)."""
        return sync % self.fragments

    def step_of(self, syncs_done: int) -> int:
        """The inner step at which ``syncs_done`` syncs have happened."""
        return syncs_done * self.interval


__all__ = ["Fragment", "Schedule", "split"]
