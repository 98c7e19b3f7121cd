"""Reduce operations of the all-reduce schedules, applied in place.

Supported ops are ``sum``, ``avg``, ``min``, ``max`` and ``prod`` over
float32, float16, bfloat16 (``ml_dtypes.bfloat16``), int32 and int64.

Invariants:

- ``combine(op, acc, incoming)`` writes ``acc <op>= incoming`` into ``acc``
  without allocating a result array; ``avg`` combines like ``sum``.
- ``finalize(op, seg, world)`` is the only place ``avg`` divides by the world
  size. Schedules call it exactly once per element, on the single rank that
  owns the element's segment, before that rank sends the final bytes; every
  other rank receives those bytes, so all ranks hold the same result.
- Arithmetic is the dtype's own: integers wrap on overflow (sum and prod
  over integers are therefore exact whatever the order), float16 and
  bfloat16 partial sums are rounded to the dtype after every combine (the
  ml_dtypes ufuncs compute in float32 and round to nearest even). ``avg``
  over integers is refused with ``InvalidArgument``.
"""

from __future__ import annotations

from typing import Any, Final

import ml_dtypes
import numpy as np
import numpy.typing as npt

from collnet.errors import InvalidArgument

OPS: Final[tuple[str, ...]] = ("sum", "avg", "min", "max", "prod")

DTYPES: Final[tuple[np.dtype[Any], ...]] = (
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.int32),
    np.dtype(np.int64),
)

# The names used on the wire (the SDK's requests, digests): numpy's own names.
DTYPE_BY_NAME: Final[dict[str, np.dtype[Any]]] = {dt.name: dt for dt in DTYPES}
_FLOAT_DTYPES: Final = frozenset(DTYPES[:3])

_UFUNCS: Final[dict[str, np.ufunc]] = {
    "sum": np.add,
    "avg": np.add,
    "min": np.minimum,
    "max": np.maximum,
    "prod": np.multiply,
}


def is_float_dtype(dtype: np.dtype[Any]) -> bool:
    """True for the floating dtypes the schedules support (bfloat16 included)."""
    return dtype in _FLOAT_DTYPES


def check_op(op: str, dtype: np.dtype[Any]) -> None:
    """Raise ``InvalidArgument`` unless ``op`` may reduce arrays of ``dtype``."""
    if op not in _UFUNCS:
        raise InvalidArgument(f"unknown reduce op {op!r}; expected one of {OPS}", op=op)
    if dtype not in DTYPES:
        names = ", ".join(str(d) for d in DTYPES)
        raise InvalidArgument(
            f"unsupported dtype {dtype} for all-reduce; expected one of {names}",
            dtype=str(dtype),
        )
    if op == "avg" and dtype not in _FLOAT_DTYPES:
        raise InvalidArgument(
            f"op 'avg' needs a floating dtype, got {dtype}; use 'sum' and divide yourself",
            op=op,
            dtype=str(dtype),
        )


def combine(op: str, acc: npt.NDArray[Any], incoming: npt.NDArray[Any]) -> None:
    """``acc = acc <op> incoming`` in place (same shape and dtype)."""
    _UFUNCS[op](acc, incoming, out=acc)


def finalize(op: str, seg: npt.NDArray[Any], world: int) -> None:
    """Turn a fully combined segment into the result: divide by ``world`` for avg."""
    if op != "avg" or world == 1:
        return
    divisor = seg.dtype.type(world)
    if int(divisor) == world:
        np.true_divide(seg, divisor, out=seg)
    else:
        # world is not exactly representable in this dtype (bfloat16 above 256,
        # float16 above 2048): divide in float32 and round once.
        seg[...] = np.true_divide(seg, np.float32(world), dtype=np.float32)
