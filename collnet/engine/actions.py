"""What the collective engine asks its executor to do.

The engine (``Router`` and ``Run``) never touches a link, a future or a
clock: it takes events and returns these actions. The executor in the daemon
performs them in order: it sends what ``Transmit`` and ``SendAbort`` name,
resolves the caller's handle on ``Finished`` or ``Failed``, releases a failed
collective's buffer on ``Settled``, and wakes collectives still setting up
their links on ``AbortedEarly``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from collnet.errors import CollnetError
from collnet.wire.datalink import AbortMessage, Key


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``payload`` to rank ``to`` of collective ``key`` with metadata ``head``.

    ``payload`` may be a view of the caller's tensor: the schedule does not
    touch those bytes until the receiver has consumed them, and the executor
    drains every link before it tells the caller the collective completed.
    ``fan``: the schedule's (``Schedule.fan``), how many links share this
    node's own while it sends; ``timed``: whether the far end's meter may time
    it (not where ``Schedule.shares_node_link``).
    """

    key: Key
    to: int
    head: list[Any]
    payload: memoryview
    fan: int = 1
    timed: bool = True


@dataclass(frozen=True, slots=True)
class SendAbort:
    """Tell ``peer`` that a collective failed (and why)."""

    peer: str
    message: AbortMessage


@dataclass(frozen=True, slots=True)
class Finished:
    """Collective ``key`` completed here: the result is in the caller's buffer."""

    key: Key


@dataclass(frozen=True, slots=True)
class Failed:
    """Collective ``key`` failed here with ``error``; its buffer may still be
    written by pieces in flight until ``Settled``."""

    key: Key
    error: CollnetError


@dataclass(frozen=True, slots=True)
class Settled:
    """No piece of failed collective ``key`` can land in its buffer any more."""

    key: Key


@dataclass(frozen=True, slots=True)
class AbortedEarly:
    """A member aborted ``key`` before it started here (a setup may stop waiting)."""

    key: Key


EngineAction = Transmit | SendAbort | Finished | Failed | Settled | AbortedEarly
