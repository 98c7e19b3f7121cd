"""Local-API requests of the collectives beside all-reduce: broadcast, all-gather
(equal and variable sizes), reduce-scatter and barrier.

They follow ``collnet.wire.localapi``'s rules (``parse_request`` knows them
too): parsed once, ``parse_request(r.to_wire()) == r``, absent fields left out,
and an ``InvalidArgument`` about a request whose ``tag`` parsed carries
``tag`` (and ``epoch``) in its fields, so the daemon refuses the collective
on the other members at once. Every request names a collective ``(epoch,
tag)`` in the world of the epoch the trainer agreed to; ranks are positions
in that world's peer list.

Several trainers per node (``local_size`` > 1, the same on every node) each
name their ``local_rank``; ranks are then trainers' ranks: node ``d``'s
trainer ``l`` is rank ``d * local_size + l`` of ``size * local_size``.

A tensor is ``count`` elements of ``dtype`` at byte ``offset`` of segment
``shm``; an output is ``out_shm`` at ``out_offset``, its length implied by the
kind. Every reply is empty but the counts phase of ``AllGatherV``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

from collnet.algo.select import BROADCAST_ALGORITHMS
from collnet.errors import InvalidArgument
from collnet.membership.bounds import MAX_WORLD_PEERS
from collnet.wire.fields import (
    MAX_LOCAL_SIZE,
    Tag,
    int_field,
    is_int,
    local_rank_field,
    local_size_field,
    named_fields,
    reduce_op_field,
    str_field,
    tensor_fields,
    tensor_wire,
    timeout_field,
    wire,
)

__all__ = [
    "COLLECTIVE_TYPES",
    "AllGather",
    "AllGatherV",
    "Barrier",
    "Broadcast",
    "CollectiveRequest",
    "ReduceScatter",
    "counts_tag",
]


def counts_tag(tag: Tag) -> str:
    """The tag of an ``AllGatherV``'s counts phase: derived from the collective's own
    (``repr``, so ``5`` and ``"5"`` stay apart) and never a default tag (an int)."""
    return f"{tag!r}/counts"


def _output(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The tensor fields and the output of a collective that writes one."""
    return {
        **tensor_fields(obj, kind),
        "out_shm": str_field(obj, kind, "out_shm"),
        "out_offset": int_field(obj, kind, "out_offset", 0),
        "local_rank": local_rank_field(obj),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Broadcast:
    """Broadcast ``root``'s tensor into every member's, in place.

    ``algo``: ``auto``, ``chain`` or ``star`` (``collnet.algo.select``).
    """

    KIND: ClassVar[str] = "broadcast"
    tag: Tag
    shm: str
    count: int
    dtype: str
    root: int
    offset: int = 0
    codec: str = "none"
    algo: str = "auto"
    epoch: int | None = None
    timeout_s: float | None = None
    local_size: int = 1
    local_rank: int = 0

    def to_wire(self) -> dict[str, Any]:
        return tensor_wire(self, root=self.root, algo=self.algo, local_rank=_rank(self))

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        def parse() -> dict[str, Any]:
            fields = tensor_fields(obj, cls.KIND)
            root = int_field(obj, cls.KIND, "root")
            algo = str_field(obj, cls.KIND, "algo", "auto")
            if algo not in BROADCAST_ALGORITHMS:
                raise InvalidArgument(
                    f"unknown broadcast algorithm {algo!r}; use one of {list(BROADCAST_ALGORITHMS)}"
                )
            return {**fields, "root": root, "algo": algo, "local_rank": local_rank_field(obj)}

        return cls(**named_fields(obj, cls.KIND, parse))


@dataclass(frozen=True, slots=True, kw_only=True)
class AllGather:
    """Every member's ``count`` elements, in rank order, into ``out_shm`` (``size *
    count`` elements): rank ``k``'s at ``[k * count, (k + 1) * count)``."""

    KIND: ClassVar[str] = "all_gather"
    tag: Tag
    shm: str
    count: int
    dtype: str
    out_shm: str
    offset: int = 0
    out_offset: int = 0
    codec: str = "none"
    epoch: int | None = None
    timeout_s: float | None = None
    local_size: int = 1
    local_rank: int = 0

    def to_wire(self) -> dict[str, Any]:
        return tensor_wire(
            self, out_shm=self.out_shm, out_offset=self.out_offset, local_rank=_rank(self)
        )

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        return cls(**named_fields(obj, cls.KIND, lambda: _output(obj, cls.KIND)))


@dataclass(frozen=True, slots=True, kw_only=True)
class AllGatherV:
    """All-gather where every member contributes its own ``count`` (0 allowed).

    Two phases, one request each, both under this collective's tag:

    - without ``counts``: the daemons all-gather their ``count`` (under
      ``counts_tag(tag)``); the reply is ``{"counts": [...]}`` in rank order;
    - with ``counts`` (that reply) and ``out_shm``: the data, rank ``k``'s
      ``counts[k]`` elements at ``sum(counts[:k])`` of the output.
    """

    KIND: ClassVar[str] = "all_gather_v"
    tag: Tag
    shm: str
    count: int
    dtype: str
    offset: int = 0
    out_shm: str | None = None
    out_offset: int = 0
    counts: tuple[int, ...] | None = None
    codec: str = "none"
    epoch: int | None = None
    timeout_s: float | None = None
    local_size: int = 1
    local_rank: int = 0

    def to_wire(self) -> dict[str, Any]:
        return tensor_wire(
            self,
            out_shm=self.out_shm,
            out_offset=self.out_offset,
            counts=None if self.counts is None else list(self.counts),
            local_rank=_rank(self),
        )

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        def parse() -> dict[str, Any]:
            fields = tensor_fields(obj, cls.KIND)
            out_offset = int_field(obj, cls.KIND, "out_offset", 0)
            counts = _counts(obj.get("counts"))
            out_shm = None if obj.get("out_shm") is None else str_field(obj, cls.KIND, "out_shm")
            if (counts is None) != (out_shm is None):
                raise InvalidArgument("all_gather_v: 'counts' and 'out_shm' come together")
            return {
                **fields,
                "out_shm": out_shm,
                "out_offset": out_offset,
                "counts": counts,
                "local_rank": local_rank_field(obj),
            }

        return cls(**named_fields(obj, cls.KIND, parse))


def _rank(req: CollectiveRequest) -> int | None:
    """``local_rank`` as the wire carries it: left out when 0."""
    return req.local_rank or None


def _counts(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    # One count per trainer: a node's local group names one each.
    most = MAX_WORLD_PEERS * MAX_LOCAL_SIZE
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= most:
        raise InvalidArgument(
            f"field 'counts' must be a list of 1 to {most} ints, got {value!r:.40}"
        )
    if not all(is_int(c) and c >= 0 for c in value):
        raise InvalidArgument(f"field 'counts' must hold non-negative ints, got {value!r:.40}")
    return tuple(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReduceScatter:
    """Reduce ``count`` elements across the world; this rank's block of the result goes
    to ``out_shm``. Block ``k`` is ``collnet.algo.reducescatter.output_range(count,
    size, k)``. The input is not modified."""

    KIND: ClassVar[str] = "reduce_scatter"
    tag: Tag
    shm: str
    count: int
    dtype: str
    out_shm: str
    offset: int = 0
    out_offset: int = 0
    reduction: str = "sum"
    codec: str = "none"
    epoch: int | None = None
    timeout_s: float | None = None
    local_size: int = 1
    local_rank: int = 0

    def to_wire(self) -> dict[str, Any]:
        return tensor_wire(
            self,
            out_shm=self.out_shm,
            out_offset=self.out_offset,
            reduce=self.reduction,
            local_rank=_rank(self),
        )

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        return cls(
            **named_fields(
                obj,
                cls.KIND,
                lambda: {**_output(obj, cls.KIND), "reduction": reduce_op_field(obj, cls.KIND)},
            )
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Barrier:
    """Returns once every member of the world has entered it; no tensor."""

    KIND: ClassVar[str] = "barrier"
    tag: Tag
    epoch: int | None = None
    timeout_s: float | None = None
    local_size: int = 1
    local_rank: int = 0

    def to_wire(self) -> dict[str, Any]:
        return wire(
            self.KIND,
            self.local_size,
            tag=self.tag,
            epoch=self.epoch,
            timeout_s=self.timeout_s,
            local_rank=_rank(self),
        )

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        def parse() -> dict[str, Any]:
            return {
                "timeout_s": timeout_field(obj),
                "local_size": local_size_field(obj),
                "local_rank": local_rank_field(obj),
            }

        return cls(**named_fields(obj, cls.KIND, parse))


CollectiveRequest = Broadcast | AllGather | AllGatherV | ReduceScatter | Barrier

COLLECTIVE_TYPES: Final[tuple[type[CollectiveRequest], ...]] = (
    Broadcast,
    AllGather,
    AllGatherV,
    ReduceScatter,
    Barrier,
)
