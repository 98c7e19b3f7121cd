"""Where the daemon finds a caller's tensor: its own bytes in SDK memory, or staging.

A tensor whose bytes lie contiguously in a segment from ``Comm.empty`` is
named in place (the daemon reads and writes it with no copy); any other one
is given a staging segment, lent until the request is over, and copied in
(``copy_in``, for inputs) and back (by the caller, on success, for outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from collnet.algo.ops import DTYPE_BY_NAME
from collnet.errors import InvalidArgument
from collnet_client.memory import SharedMemory, Staging
from collnet_client.tensors import HostTensor


@dataclass(frozen=True)
class Location:
    """Bytes the daemon can map: segment ``shm`` at byte ``offset``."""

    shm: str
    offset: int


def check_dtype(host: HostTensor) -> None:
    # (Not ``.get(name) != dtype``: numpy reads None as float64, so that let float64 by.)
    known = DTYPE_BY_NAME.get(host.dtype.name)
    if known is None or known != host.dtype:
        raise InvalidArgument(f"unsupported dtype {host.dtype}; use one of {list(DTYPE_BY_NAME)}")


def place(
    memory: SharedMemory, host: HostTensor, *, copy_in: bool
) -> tuple[npt.NDArray[Any], Location, Staging | None]:
    """The host array the daemon will use for ``host``, where it lies, and the staging
    lent for it (None when the caller's own bytes are used)."""
    where = memory.locate(host.array) if host.array is not None else None
    if where is not None:
        assert host.array is not None
        return host.array, Location(where[0].name, where[1]), None
    staging = memory.stage(host.nbytes)
    view = staging[1][: host.nbytes].view(host.dtype).reshape(host.shape)
    if copy_in:
        host.copy_into(view)
    return view, Location(staging[0].name, 0), staging
