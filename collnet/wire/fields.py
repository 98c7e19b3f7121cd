"""The checks every local-API request field goes through, shared by its typed homes.

``collnet.wire.localapi`` and ``collnet.wire.collectives`` build their
``from_wire`` parsers from these: each takes the decoded map, the request
kind (for the message) and the field name, and returns the checked value or
raises ``InvalidArgument`` (a bool is never an int; nil is the same as
absent). ``wire`` builds a request map, leaving out what is absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Final, Protocol, TypeAlias

from collnet.algo import ALGORITHMS
from collnet.algo.ops import DTYPE_BY_NAME, OPS
from collnet.codec.registry import get_codec
from collnet.errors import InvalidArgument

# Trainers of one node sharing a daemon: bounds what one group may make it hold.
MAX_LOCAL_SIZE: Final = 256
MAX_BENCH_ITERS: Final = 1000

Tag: TypeAlias = int | str
REQUIRED: Final[Any] = object()


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def value_of(obj: dict[str, Any], kind: str, name: str, default: Any) -> Any:
    value = obj.get(name)
    if value is None:  # nil on the wire is the same as absent
        if default is REQUIRED:
            raise InvalidArgument(f"request {kind!r} needs field {name!r}")
        return default
    return value


def int_field(obj: dict[str, Any], kind: str, name: str, default: Any = REQUIRED) -> int:
    value = value_of(obj, kind, name, default)
    if not is_int(value):
        raise InvalidArgument(f"field {name!r} must be int, got {value!r:.40}")
    if value < 0:
        raise InvalidArgument(f"field {name!r} must not be negative, got {value}")
    return int(value)


def str_field(obj: dict[str, Any], kind: str, name: str, default: Any = REQUIRED) -> str:
    value = value_of(obj, kind, name, default)
    if not isinstance(value, str):
        raise InvalidArgument(f"field {name!r} must be str, got {value!r:.40}")
    return value


def tag_field(obj: dict[str, Any], kind: str, name: str = "tag") -> Tag:
    tag = obj.get(name)
    if not isinstance(tag, int | str) or isinstance(tag, bool):
        raise InvalidArgument(f"{kind} needs an int or str {name!r}")
    return tag


def epoch_field(obj: dict[str, Any]) -> int | None:
    """The epoch a request runs in; None: the daemon's current one."""
    epoch = obj.get("epoch")
    if epoch is not None and (not is_int(epoch) or epoch < 0):
        raise InvalidArgument(f"bad epoch {epoch!r:.40}: an epoch is a non-negative int")
    return epoch


def timeout_field(obj: dict[str, Any]) -> float | None:
    value = obj.get("timeout_s")
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidArgument(f"field 'timeout_s' must be a number, got {value!r:.40}")
    if value <= 0:
        raise InvalidArgument(f"field 'timeout_s' must be positive, got {value!r}")
    return float(value)


def local_size_field(obj: dict[str, Any]) -> int:
    size = obj.get("local_size", 1)
    if not is_int(size) or not 1 <= size <= MAX_LOCAL_SIZE:
        raise InvalidArgument(f"local_size must be an int in [1, {MAX_LOCAL_SIZE}], got {size!r}")
    return int(size)


def local_rank_field(obj: dict[str, Any]) -> int:
    """``local_rank``: this trainer's place among its node's ``local_size`` (0 if absent)."""
    size = local_size_field(obj)
    rank = obj.get("local_rank", 0)
    if not is_int(rank) or not 0 <= rank < size:
        raise InvalidArgument(
            f"local_rank must be an int in [0, local_size {size}), got {rank!r:.40}"
        )
    return int(rank)


def dtype_field(obj: dict[str, Any], kind: str, default: Any = REQUIRED) -> str:
    name = str_field(obj, kind, "dtype", default)
    if name not in DTYPE_BY_NAME:
        raise InvalidArgument(f"unsupported dtype {name!r}; use one of {list(DTYPE_BY_NAME)}")
    return name


def reduce_op_field(obj: dict[str, Any], kind: str) -> str:
    op = str_field(obj, kind, "reduce", "sum")
    if op not in OPS:
        raise InvalidArgument(f"unknown reduce op {op!r}; use one of {list(OPS)}")
    return op


def algo_field(obj: dict[str, Any], kind: str) -> str:
    """An all-reduce algorithm (broadcast has its own set)."""
    algo = str_field(obj, kind, "algo", "auto")
    if algo not in ALGORITHMS:
        raise InvalidArgument(f"unknown algorithm {algo!r}; use one of {list(ALGORITHMS)}")
    return algo


def codec_field(obj: dict[str, Any], kind: str) -> str:
    codec = str_field(obj, kind, "codec", "none")
    get_codec(codec)  # the name only: the daemon's block size is checked where it is known
    return codec


def reduction_fields(obj: dict[str, Any], kind: str) -> tuple[str, str, str]:
    """The reduction op, codec and algorithm of an all-reduce (or its benchmark)."""
    op, algo = reduce_op_field(obj, kind), algo_field(obj, kind)
    return op, codec_field(obj, kind), algo


def named_fields(
    obj: dict[str, Any], kind: str, parse: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``tag`` and ``epoch`` of a collective's request, then the fields ``parse`` reads.

    An ``InvalidArgument`` from ``parse`` carries ``tag`` (and ``epoch``) in its
    fields: it names the collective, so the daemon can abort it on the other peers.
    """
    tag, epoch = tag_field(obj, kind), epoch_field(obj)
    try:
        fields = parse()
    except InvalidArgument as exc:
        where: dict[str, Any] = {"tag": tag} if epoch is None else {"tag": tag, "epoch": epoch}
        raise InvalidArgument(exc.message, **{**exc.fields, **where}) from None
    return {"tag": tag, "epoch": epoch, **fields}


def tensor_fields(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields every request on one tensor has: its tensor, codec, deadline, local size."""
    return {
        "shm": str_field(obj, kind, "shm"),
        "offset": int_field(obj, kind, "offset", 0),
        "count": int_field(obj, kind, "count"),
        "dtype": dtype_field(obj, kind),
        "codec": codec_field(obj, kind),
        "timeout_s": timeout_field(obj),
        "local_size": local_size_field(obj),
    }


class TensorRequest(Protocol):
    """What ``tensor_wire`` reads of a request on one tensor (``tensor_fields``)."""

    KIND: ClassVar[str]

    @property
    def tag(self) -> Tag: ...
    @property
    def epoch(self) -> int | None: ...
    @property
    def shm(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def codec(self) -> str: ...
    @property
    def timeout_s(self) -> float | None: ...
    @property
    def local_size(self) -> int: ...


def tensor_wire(req: TensorRequest, **more: Any) -> dict[str, Any]:
    """The map of a request on one tensor: the fields of ``tensor_fields``, then ``more``."""
    return wire(
        req.KIND,
        req.local_size,
        tag=req.tag,
        epoch=req.epoch,
        shm=req.shm,
        offset=req.offset,
        count=req.count,
        dtype=req.dtype,
        codec=req.codec,
        timeout_s=req.timeout_s,
        **more,
    )


def wire(kind: str, local_size: int = 1, **fields: Any) -> dict[str, Any]:
    wire = {"op": kind, **{k: v for k, v in fields.items() if v is not None}}
    if local_size != 1:
        wire["local_size"] = local_size
    return wire
