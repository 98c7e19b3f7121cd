"""Collective algorithms as sans-I/O schedules.

A schedule consumes events (start, a message arrived, a peer was lost) and
returns actions (``Send``, ``Complete``, ``Abort``); it never touches a
socket, an event loop or the environment. See ``actions.Schedule`` for the
executor protocol, ``ring`` and ``star`` for the all-reduce algorithms and
their invariants, and ``select.make_all_reduce`` to build one by name.
"""

from collnet.algo.actions import Abort, Action, Complete, Schedule, Send
from collnet.algo.ops import DTYPES, OPS, check_op, combine, finalize
from collnet.algo.partition import Partition, chunk_bounds, segment_bounds
from collnet.algo.ring import RingAllReduce
from collnet.algo.select import ALGORITHMS, choose_algorithm, make_all_reduce
from collnet.algo.star import StarAllReduce

__all__ = [
    "ALGORITHMS",
    "DTYPES",
    "OPS",
    "Abort",
    "Action",
    "Complete",
    "Partition",
    "RingAllReduce",
    "Schedule",
    "Send",
    "StarAllReduce",
    "check_op",
    "choose_algorithm",
    "chunk_bounds",
    "combine",
    "finalize",
    "make_all_reduce",
    "segment_bounds",
]
