"""Choosing an all-reduce or broadcast schedule by name, or by size for ``auto``.

``auto`` with the epoch's agreed link figures (``costs``: the world's worst
RTT and ring bottleneck, ``collnet.topology.costmodel``) picks whichever of
star and ring the cost model says is faster for this size. Without them it
picks the star when the tensor is small (``buf.nbytes <= star_max_bytes``:
two hops beat ``2(W - 1)`` ring steps when latency dominates) or the world
has at most two ranks (where the ring saves no bandwidth), and the ring
otherwise. The choice depends only on arguments every rank shares (the
figures are the world's, fixed with its epoch), so all ranks pick the same
schedule. A broadcast's
``auto`` picks its star (one hop from the root) by the same rule and its
chain (a pipeline from the root, every link carrying the tensor once)
otherwise.
"""

from __future__ import annotations

from typing import Any, Final

import numpy.typing as npt

from collnet.algo.actions import Schedule
from collnet.algo.broadcast import TreeBroadcast
from collnet.algo.reducer import check_tensor
from collnet.algo.ring import RingAllReduce
from collnet.algo.star import StarAllReduce
from collnet.codec.base import Codec
from collnet.errors import InvalidArgument
from collnet.topology.costmodel import LinkCosts, prefer_star

ALGORITHMS: Final[tuple[str, ...]] = ("auto", "ring", "star")
BROADCAST_ALGORITHMS: Final[tuple[str, ...]] = ("auto", "chain", "star")

DEFAULT_STAR_MAX_BYTES: Final = 256 * 1024


def choose_algorithm(
    algo: str,
    world: int,
    nbytes: int,
    star_max_bytes: int = DEFAULT_STAR_MAX_BYTES,
    costs: LinkCosts | None = None,
) -> str:
    """Resolve ``algo`` (``auto``, ``ring`` or ``star``) to ``ring`` or ``star``."""
    if algo not in ALGORITHMS:
        raise InvalidArgument(
            f"unknown all-reduce algorithm {algo!r}; expected one of {ALGORITHMS}", algo=algo
        )
    if algo != "auto":
        return algo
    if costs is not None and costs.valid():
        return "star" if prefer_star(costs, world, nbytes) else "ring"
    return "star" if nbytes <= star_max_bytes or world <= 2 else "ring"


def make_all_reduce(
    algo: str,
    rank: int,
    world: int,
    buf: npt.NDArray[Any],
    op: str,
    codec: Codec | None = None,
    chunk_bytes: int = 1 << 20,
    star_max_bytes: int = DEFAULT_STAR_MAX_BYTES,
    root: int = 0,
    costs: LinkCosts | None = None,
) -> Schedule:
    """Build the all-reduce schedule ``algo`` names for ``rank`` of ``world`` over ``buf``."""
    check_tensor(buf)
    chosen = choose_algorithm(algo, world, int(buf.nbytes), star_max_bytes, costs)
    if chosen == "star":
        return StarAllReduce(rank, world, buf, op, codec, chunk_bytes, root=root)
    return RingAllReduce(rank, world, buf, op, codec, chunk_bytes)


def make_broadcast(
    algo: str,
    rank: int,
    world: int,
    buf: npt.NDArray[Any],
    root: int = 0,
    codec: Codec | None = None,
    chunk_bytes: int = 1 << 20,
    star_max_bytes: int = DEFAULT_STAR_MAX_BYTES,
) -> TreeBroadcast:
    """Build the broadcast ``algo`` (``auto``, ``chain`` or ``star``) names from ``root``."""
    if algo not in BROADCAST_ALGORITHMS:
        raise InvalidArgument(
            f"unknown broadcast algorithm {algo!r}; expected one of {BROADCAST_ALGORITHMS}",
            algo=algo,
        )
    check_tensor(buf)
    tree = algo
    if algo == "auto":
        small = int(buf.nbytes) <= star_max_bytes or world <= 2
        tree = "star" if small else "chain"
    return TreeBroadcast(rank, world, buf, root, codec, chunk_bytes, tree=tree)
