"""Choosing an all-reduce or broadcast schedule by name, or by size for ``auto``.

``auto`` with the epoch's agreed link figures (``costs``: the world's worst
RTT, ring bottleneck and slowest pair, ``collnet.topology.costmodel``) picks
whichever of star, direct and ring the cost model says is fastest for this
size. Without them it
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

from collnet.algo.broadcast import TreeBroadcast
from collnet.algo.chunked import ChunkedSchedule
from collnet.algo.direct import DirectAllReduce
from collnet.algo.reducer import check_tensor
from collnet.algo.ring import RingAllReduce
from collnet.algo.star import StarAllReduce
from collnet.codec.base import Codec
from collnet.errors import InvalidArgument
from collnet.topology.costmodel import LinkCosts, best_algorithm

ALGORITHMS: Final[tuple[str, ...]] = ("auto", "ring", "star", "direct")
BROADCAST_ALGORITHMS: Final[tuple[str, ...]] = ("auto", "chain", "star")

DEFAULT_STAR_MAX_BYTES: Final = 256 * 1024


def choose_algorithm(
    algo: str,
    world: int,
    nbytes: int,
    star_max_bytes: int = DEFAULT_STAR_MAX_BYTES,
    costs: LinkCosts | None = None,
    wire_nbytes: int | None = None,
    chunk_bytes: int = 1 << 20,
) -> str:
    """Resolve ``algo`` (``auto``, ``ring``, ``star`` or ``direct``) to a schedule's
    name. ``wire_nbytes``: what travels for the tensor's ``nbytes`` (its encoded
    size under a quantizing codec); the cost model weighs that, in chunks of
    ``chunk_bytes`` of the tensor."""
    if algo not in ALGORITHMS:
        raise InvalidArgument(
            f"unknown all-reduce algorithm {algo!r}; expected one of {ALGORITHMS}", algo=algo
        )
    if algo != "auto":
        return algo
    if costs is not None and costs.valid():
        wire = nbytes if wire_nbytes is None else wire_nbytes
        wire_chunk = max(1, chunk_bytes * wire // nbytes) if nbytes else chunk_bytes
        return best_algorithm(costs, world, wire, wire_chunk)
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
) -> ChunkedSchedule:
    """Build the all-reduce schedule ``algo`` names for ``rank`` of ``world`` over ``buf``."""
    check_tensor(buf)
    chosen = choose_algorithm(
        algo, world, int(buf.nbytes), star_max_bytes, costs, wire_nbytes(buf, codec), chunk_bytes
    )
    if chosen == "star":
        return StarAllReduce(rank, world, buf, op, codec, chunk_bytes, root=root)
    if chosen == "direct":
        return DirectAllReduce(rank, world, buf, op, codec, chunk_bytes)
    return RingAllReduce(rank, world, buf, op, codec, chunk_bytes)


def wire_nbytes(buf: npt.NDArray[Any], codec: Codec | None) -> int:
    """The bytes ``buf`` takes on the wire: its encoded size under a codec that
    knows it in advance (or its bound), its own size otherwise."""
    n = int(buf.shape[0])
    if codec is None or codec.name == "none":
        return int(buf.nbytes)
    exact = codec.encoded_nbytes(n)
    return exact if exact is not None else codec.max_encoded_nbytes(n)


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
