"""The local API: every request a trainer's SDK makes of its node's daemon, typed.

On the IPC socket a request is one msgpack map ``{"id", "op", ...fields}``:
``id`` is the transport's (the reply carries it back), ``op`` names the
request kind, the other keys are the fields below (``docs/protocol.md``). In
Python the kind is the class (``KIND``), and the reduction of an all-reduce
is ``reduction`` (``"reduce"`` on the wire), so the two no longer share a key.

Invariants:

- ``parse_request`` is the one place a request map is checked: types (a bool
  is never an int), allowed values, ranges. What it returns is valid, and no
  daemon code reads the map again. Keys it does not know are ignored, so a
  newer SDK may send more.
- Constructing a request checks nothing. The SDK sends what its caller asked
  and the daemon refuses it: only the daemon can tell the other peers of a
  collective that this one will not take part (they would otherwise wait for
  it until their deadline). So an ``InvalidArgument`` about an all-reduce
  whose ``tag`` parsed carries ``tag`` (and ``epoch``, when given) in its
  fields: the daemon aborts that collective on the others.
- ``to_wire`` leaves out what is absent (``None``; ``local_size`` 1), so the
  maps are those older SDKs sent and older daemons accept, and
  ``parse_request(r.to_wire()) == r``.
- Errors are ``InvalidArgument`` for a bad field or an unknown kind, and
  ``ProtocolError`` for something that is not a request at all.

The replies with more than a flag in them are typed in
``collnet.wire.localreplies``; the field checks live in ``collnet.wire.fields``,
and broadcast, all-gather, reduce-scatter and barrier in
``collnet.wire.collectives``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self, TypeAlias

from collnet.errors import InvalidArgument, ProtocolError
from collnet.state.digest import MAX_REVISION, numpy_dtype
from collnet.wire.collectives import COLLECTIVE_TYPES, CollectiveRequest
from collnet.wire.fields import MAX_BENCH_ITERS, Tag
from collnet.wire.fields import MAX_LOCAL_SIZE as MAX_LOCAL_SIZE  # re-exported
from collnet.wire.fields import REQUIRED as _REQUIRED
from collnet.wire.fields import algo_field as _algo
from collnet.wire.fields import dtype_field as _dtype
from collnet.wire.fields import epoch_field as _epoch
from collnet.wire.fields import int_field as _int
from collnet.wire.fields import is_int as _is_int
from collnet.wire.fields import local_size_field as _local_size
from collnet.wire.fields import named_fields as _named_fields
from collnet.wire.fields import reduce_op_field as _reduce_op
from collnet.wire.fields import reduction_fields as _reduction
from collnet.wire.fields import str_field as _str
from collnet.wire.fields import tag_field as _tag
from collnet.wire.fields import tensor_fields as _tensor_fields
from collnet.wire.fields import tensor_wire as _tensor_wire
from collnet.wire.fields import timeout_field as _timeout
from collnet.wire.fields import value_of as _value
from collnet.wire.fields import wire as _wire


@dataclass(frozen=True, slots=True)
class Hello:
    """The first request of a connection; answered with ``HelloReply``."""

    KIND: ClassVar[str] = "hello"

    def to_wire(self) -> dict[str, Any]:
        return _wire(self.KIND)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class GetWorld:
    """The world as the daemon sees it now (asks the coordinator); ``WorldReply``."""

    KIND: ClassVar[str] = "world"

    def to_wire(self) -> dict[str, Any]:
        return _wire(self.KIND)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateTopology:
    """The barrier of every active member that agrees on the next world; ``WorldReply``.

    ``local_size``: trainers of this node making the same call (the daemon
    waits for all of them, at most ``timeout_s``). Every request with a
    ``local_size`` is one of those a node's trainers make together.
    """

    KIND: ClassVar[str] = "update_topology"
    timeout_s: float | None = None
    local_size: int = 1

    def to_wire(self) -> dict[str, Any]:
        return _wire(self.KIND, self.local_size, timeout_s=self.timeout_s)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        return cls(timeout_s=_timeout(obj), local_size=_local_size(obj))


@dataclass(frozen=True, slots=True, kw_only=True)
class AllReduce:
    """Reduce ``count`` elements of ``dtype`` at byte ``offset`` of segment ``shm``
    across the world, in place; the reply is empty.

    The collective is ``(epoch, tag)``; ``epoch`` None is the daemon's current
    one. ``timeout_s`` None: the daemon's collective timeout. ``retry_of``: the
    tag this collective first ran under, when it is the SDK's retry under a new
    default tag; peers must agree on it (it is in the digest), so a retry never
    pairs with another step's collective.
    """

    KIND: ClassVar[str] = "all_reduce"
    tag: Tag
    shm: str
    count: int
    dtype: str
    offset: int = 0
    reduction: str = "sum"
    codec: str = "none"
    algo: str = "auto"
    epoch: int | None = None
    timeout_s: float | None = None
    local_size: int = 1
    retry_of: Tag | None = None

    def to_wire(self) -> dict[str, Any]:
        return _tensor_wire(self, reduce=self.reduction, algo=self.algo, retry_of=self.retry_of)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        def parse() -> dict[str, Any]:
            fields = _tensor_fields(obj, cls.KIND)
            reduction, algo = _reduce_op(obj, cls.KIND), _algo(obj, cls.KIND)
            retry_of = None if obj.get("retry_of") is None else _tag(obj, cls.KIND, "retry_of")
            return {**fields, "reduction": reduction, "algo": algo, "retry_of": retry_of}

        return cls(**_named_fields(obj, cls.KIND, parse))


@dataclass(frozen=True, slots=True)
class StateTensor:
    """One tensor of a ``SyncState``: ``[name, shm, offset, dtype, shape]`` on the wire."""

    name: str
    shm: str
    offset: int
    dtype: str  # a name ``collnet.state.numpy_dtype`` knows
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def to_wire(self) -> list[Any]:
        return [self.name, self.shm, self.offset, self.dtype, list(self.shape)]

    @classmethod
    def from_wire(cls, item: Any) -> Self:
        if not isinstance(item, list | tuple) or len(item) != 5:
            raise InvalidArgument("each tensor is [name, shm, offset, dtype, shape]")
        name, shm, offset, dtype, shape = item
        if not isinstance(name, str):
            raise InvalidArgument(f"tensor names must be distinct strings, got {name!r:.40}")
        if not isinstance(shm, str) or not _is_int(offset) or offset < 0:
            raise InvalidArgument(f"tensor {name!r}: bad shared-memory location")
        if not isinstance(shape, list | tuple) or not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidArgument(f"tensor {name!r}: bad shape {shape!r:.40}")
        if not isinstance(dtype, str):
            raise InvalidArgument(f"tensor {name!r}: bad dtype {dtype!r:.40}")
        numpy_dtype(dtype)  # InvalidArgument naming the supported ones
        return cls(name, shm, offset, dtype, tuple(shape))


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncState:
    """Bring the named tensors to the world's shared state (a barrier); ``SyncStateReply``."""

    KIND: ClassVar[str] = "sync_state"
    tensors: tuple[StateTensor, ...]
    revision: int
    epoch: int | None = None
    timeout_s: float | None = None
    local_size: int = 1

    def to_wire(self) -> dict[str, Any]:
        return _wire(
            self.KIND,
            self.local_size,
            tensors=[t.to_wire() for t in self.tensors],
            revision=self.revision,
            epoch=self.epoch,
            timeout_s=self.timeout_s,
        )

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        items = obj.get("tensors")
        if not isinstance(items, list | tuple):
            raise InvalidArgument("sync_state needs a list 'tensors' of [name, shm, offset, ...]")
        tensors: dict[str, StateTensor] = {}
        for item in items:
            tensor = StateTensor.from_wire(item)
            if tensor.name in tensors:
                raise InvalidArgument(
                    f"tensor names must be distinct strings, got {tensor.name!r:.40}"
                )
            tensors[tensor.name] = tensor
        revision = _value(obj, cls.KIND, "revision", _REQUIRED)
        if not _is_int(revision) or not 0 <= revision <= MAX_REVISION:
            raise InvalidArgument(f"revision must be an int in [0, 2**63), got {revision!r:.40}")
        return cls(
            tensors=tuple(tensors.values()),
            revision=revision,
            epoch=_epoch(obj),
            timeout_s=_timeout(obj),
            local_size=_local_size(obj),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Abort collective ``(epoch, tag)`` here and on every peer; ``{"cancelled": bool}``."""

    KIND: ClassVar[str] = "cancel"
    epoch: int
    tag: Tag

    def to_wire(self) -> dict[str, Any]:
        return _wire(self.KIND, epoch=self.epoch, tag=self.tag)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        epoch = _epoch(obj)
        if epoch is None:
            raise InvalidArgument(f"request {cls.KIND!r} needs field 'epoch'")
        return cls(epoch=epoch, tag=_tag(obj, cls.KIND))


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchAllReduce:
    """``iters`` all-reduces of a daemon-owned buffer, timed inside the daemon;
    ``{"times_s": [...]}``. Tags ``{tag}-{i}`` (and ``{tag}-b{i}`` for the
    one-element barrier before each when ``barrier``)."""

    KIND: ClassVar[str] = "bench_all_reduce"
    tag: Tag
    count: int
    iters: int = 5
    dtype: str = "float32"
    reduction: str = "sum"
    codec: str = "none"
    algo: str = "auto"
    barrier: bool = True
    epoch: int | None = None
    timeout_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return _wire(
            self.KIND,
            tag=self.tag,
            count=self.count,
            iters=self.iters,
            dtype=self.dtype,
            reduce=self.reduction,
            codec=self.codec,
            algo=self.algo,
            barrier=self.barrier,
            epoch=self.epoch,
            timeout_s=self.timeout_s,
        )

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        count, iters = _int(obj, cls.KIND, "count"), _int(obj, cls.KIND, "iters", 5)
        if count < 1 or not 1 <= iters <= MAX_BENCH_ITERS:
            raise InvalidArgument(
                f"bench_all_reduce: need count >= 1 and 1 <= iters <= {MAX_BENCH_ITERS}"
            )
        barrier = obj.get("barrier", True)
        if not isinstance(barrier, bool):
            raise InvalidArgument(f"field 'barrier' must be bool, got {barrier!r:.40}")
        reduction, codec, algo = _reduction(obj, cls.KIND)
        return cls(
            tag=_tag(obj, cls.KIND),
            count=count,
            iters=iters,
            dtype=_dtype(obj, cls.KIND, "float32"),
            reduction=reduction,
            codec=codec,
            algo=algo,
            barrier=barrier,
            epoch=_epoch(obj),
            timeout_s=_timeout(obj),
        )


@dataclass(frozen=True, slots=True)
class Release:
    """The client is done with segment ``shm``: the daemon unmaps it; empty reply."""

    KIND: ClassVar[str] = "release"
    shm: str

    def to_wire(self) -> dict[str, Any]:
        return _wire(self.KIND, shm=self.shm)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        return cls(_str(obj, cls.KIND, "shm"))


@dataclass(frozen=True, slots=True)
class Leave:
    """Graceful leave: the daemon leaves the world and stops; empty reply."""

    KIND: ClassVar[str] = "leave"

    def to_wire(self) -> dict[str, Any]:
        return _wire(self.KIND)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        return cls()


Request: TypeAlias = (
    Hello
    | GetWorld
    | UpdateTopology
    | AllReduce
    | SyncState
    | Cancel
    | BenchAllReduce
    | Release
    | Leave
    | CollectiveRequest
)

REQUEST_TYPES: Final[tuple[type[Request], ...]] = (
    Hello,
    GetWorld,
    UpdateTopology,
    AllReduce,
    SyncState,
    Cancel,
    BenchAllReduce,
    Release,
    Leave,
    *COLLECTIVE_TYPES,
)
_PARSERS: Final[dict[str, Callable[[dict[str, Any]], Request]]] = {
    cls.KIND: cls.from_wire for cls in REQUEST_TYPES
}


def parse_request(obj: dict[str, Any]) -> Request:
    """The typed request a decoded msgpack map stands for, checked in full.

    ``ProtocolError`` if ``obj`` is not a map with a string ``op``;
    ``InvalidArgument`` for an unknown kind or a bad field.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise ProtocolError("request must be a map with a string 'op'")
    parse = _PARSERS.get(obj["op"])
    if parse is None:
        raise InvalidArgument(f"unknown request {obj['op']!r:.40}")
    return parse(obj)
