"""Collective algorithms as sans-I/O schedules.

A schedule consumes events (start, a message arrived, a peer was lost) and
returns actions (``Send``, ``Complete``, ``Abort``); it never touches a
socket, an event loop or the environment. See ``actions.Schedule`` for the
executor protocol, ``ring``, ``star`` and ``direct`` for the all-reduce
algorithms and their invariants, and ``select.make_all_reduce`` to build one by name. The
other collectives: ``reducescatter`` and ``allgather`` (the ring's phases
alone, through ``ring.RingSchedule``), ``broadcast`` (a chain or star
pipeline from the root; ``select.make_broadcast``) and ``barrier``.
"""

from collnet.algo.actions import Abort, Action, Complete, Schedule, Send
from collnet.algo.allgather import RingAllGather, all_gather_equal
from collnet.algo.barrier import DisseminationBarrier
from collnet.algo.broadcast import TreeBroadcast
from collnet.algo.direct import DirectAllReduce
from collnet.algo.ops import DTYPES, OPS, check_op, combine, finalize
from collnet.algo.partition import Blocks, Partition, chunk_bounds, segment_bounds
from collnet.algo.reducescatter import RingReduceScatter
from collnet.algo.ring import RingAllReduce
from collnet.algo.select import (
    ALGORITHMS,
    BROADCAST_ALGORITHMS,
    choose_algorithm,
    make_all_reduce,
    make_broadcast,
)
from collnet.algo.star import StarAllReduce

__all__ = [
    "ALGORITHMS",
    "BROADCAST_ALGORITHMS",
    "DTYPES",
    "OPS",
    "Abort",
    "Action",
    "Blocks",
    "Complete",
    "DirectAllReduce",
    "DisseminationBarrier",
    "Partition",
    "RingAllGather",
    "RingAllReduce",
    "RingReduceScatter",
    "Schedule",
    "Send",
    "StarAllReduce",
    "TreeBroadcast",
    "all_gather_equal",
    "check_op",
    "choose_algorithm",
    "chunk_bounds",
    "combine",
    "finalize",
    "make_all_reduce",
    "make_broadcast",
    "segment_bounds",
]
