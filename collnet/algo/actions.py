"""Actions that collective schedules ask their executor to perform.

Schedules never touch sockets: they consume events (a message has fully
arrived, a peer was lost) and return actions. The executor in the daemon sends
what ``Send`` names over the peer link, and resolves the collective's handle on
``Complete`` or ``Abort``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from collnet.errors import CollnetError


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``payload`` to rank ``to`` as message (step, chunk).

    ``payload`` may be a view into the tensor: the schedule guarantees it does
    not modify those bytes until the receiver has consumed them.
    """

    to: int
    step: int
    chunk: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Complete:
    """The collective finished: the result is in the caller's buffer."""


@dataclass(frozen=True, slots=True)
class Abort:
    """The collective failed; ``error`` says why (e.g. ``PeerLost``)."""

    error: CollnetError


Action = Send | Complete | Abort


class Schedule(abc.ABC):
    """A sans-I/O collective among ``world`` ranks, seen from ``rank``.

    The executor protocol:
    1. ``start()`` once; perform the returned actions.
    2. for every incoming message (src, step, chunk, nbytes): call
       ``recv_buffer`` to learn where its bytes go (a writable memoryview of
       exactly ``nbytes``), fill it, then call ``on_receive``.
    3. ``on_peer_lost(rank)`` when a participant dies.
    A message the schedule does not expect raises ``ProtocolError`` from
    ``recv_buffer``; after ``Complete`` or ``Abort`` no further actions come.

    Agreement: the executor checks that every message comes from a rank running
    the same collective (the digest), so a rank whose ``Complete`` depends, at
    least through other ranks, on a message from every rank knows they all
    agreed. A schedule where that does not hold (a broadcast's root receives
    nothing; an empty ring block leaves a rank unheard) says so with
    ``needs_agreement``, and the executor then reports success only once every
    member has confirmed the digest. It must be the same on every rank of one
    collective (a function of what the digest covers), or a rank would wait
    for a confirmation nobody sends.
    """

    rank: int
    world: int

    @abc.abstractmethod
    def start(self) -> list[Action]: ...

    @abc.abstractmethod
    def recv_buffer(self, src: int, step: int, chunk: int, nbytes: int) -> memoryview: ...

    @abc.abstractmethod
    def on_receive(self, src: int, step: int, chunk: int) -> list[Action]: ...

    @abc.abstractmethod
    def on_peer_lost(self, rank: int) -> list[Action]: ...

    @property
    @abc.abstractmethod
    def finished(self) -> bool:
        """True once Complete or Abort has been returned."""

    @property
    def needs_agreement(self) -> bool:
        """True where ``Complete`` alone does not prove every rank agreed (see above)."""
        return False

    @property
    def fan(self) -> int:
        """How many peers this rank sends to, or hears from, at once through its
        own network link; a link to each of them gets that share of its
        connections (``collnet.topology.striping.connections_sharing``)."""
        return 1

    @property
    def shares_node_link(self) -> bool:
        """Whether some node's link (this one's or a peer's) carries several of
        this collective's links at once: what one of them carries is then a
        share of its path, which its meter must not take for the path's rate.
        True wherever ``fan`` > 1, and for a star, whose root serves W - 1 links
        at once although its stripes are not narrowed (it carries small
        messages, whose first round trips want every connection:
        ``collnet.transport.pieceq.pieces_for``)."""
        return self.fan > 1
