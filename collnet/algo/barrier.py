"""Barrier as a dissemination pattern: no payload, ``ceil(log2 W)`` rounds.

In round ``k`` rank ``r`` sends an empty message ``(step k, chunk 0)`` to
``(r + 2**k) % W`` and waits for one from ``(r - 2**k) % W``; it sends
round ``k + 1`` only once it has both sent round ``k`` and received round
``k``'s message. By induction, after receiving round ``k`` rank ``r`` knows
that ranks ``r - 2**(k+1) + 1 .. r`` have all entered the barrier; after the
last round that is every rank. So ``Complete`` comes on every rank, and only
after every rank has called ``start()``; it costs ``ceil(log2 W)`` one-way
latencies and ``W * ceil(log2 W)`` empty messages. The same chain of
messages, each checked against the digest, tells a rank that every rank runs
this barrier: ``needs_agreement`` stays False.

Messages may arrive in any order: a round's message that comes early (its
sender is ahead) is kept and counted when this rank gets there.

Failure model: a participant lost before ``Complete`` aborts with
``PeerLost`` naming the round this rank was waiting in (``step``, phase
``dissemination``). Unexpected messages (wrong sender for the round, a
round that does not exist, a duplicate, any payload) raise
``ProtocolError`` and leave the schedule unfinished; after ``Abort``, empty
messages are accepted and ignored.
"""

from __future__ import annotations

from collnet.algo.actions import Abort, Action, Complete, Schedule, Send
from collnet.algo.partition import check_group
from collnet.errors import PeerLost, ProtocolError

_IDLE, _POSTED, _DONE = 0, 1, 2

_EMPTY = memoryview(b"")


class DisseminationBarrier(Schedule):
    """A barrier among ``world`` ranks, seen from ``rank``."""

    algorithm = "dissemination"
    collective = "barrier"

    def __init__(self, rank: int, world: int) -> None:
        check_group(rank, world)
        self.rank = rank
        self.world = world
        self._rounds = (world - 1).bit_length()
        self._state = bytearray(self._rounds)
        self._sent = 0
        self._started = False
        self._finished = False
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> list[Action]:
        if self._started:
            raise ProtocolError("start() called twice")
        self._started = True
        return self._advance()

    def recv_buffer(self, src: int, step: int, chunk: int, nbytes: int) -> memoryview:
        if nbytes != 0:
            raise ProtocolError(
                f"barrier messages carry no payload, rank {src} announced {nbytes} bytes",
                rank=src,
                nbytes=nbytes,
            )
        if self._aborted:
            return memoryview(bytearray(0))
        self._locate(src, step, chunk)
        if self._state[step] != _IDLE:
            raise ProtocolError(
                f"duplicate barrier message (round {step}) from rank {src}", rank=src, step=step
            )
        self._state[step] = _POSTED
        return memoryview(bytearray(0))

    def on_receive(self, src: int, step: int, chunk: int) -> list[Action]:
        if self._aborted:
            return []
        self._locate(src, step, chunk)
        if self._state[step] != _POSTED:
            what = "duplicate" if self._state[step] == _DONE else "unannounced"
            raise ProtocolError(
                f"{what} barrier message (round {step}) from rank {src}", rank=src, step=step
            )
        self._state[step] = _DONE
        return self._advance()

    def on_peer_lost(self, rank: int) -> list[Action]:
        if self._finished or not 0 <= rank < self.world:
            return []
        waiting = max(0, self._sent - 1)
        done = sum(1 for s in self._state if s == _DONE)
        self._finished = True
        self._aborted = True
        return [
            Abort(
                PeerLost(
                    f"peer rank {rank} lost during barrier step {waiting} (dissemination); "
                    f"rank {self.rank} had received {done}/{self._rounds} rounds",
                    rank=rank,
                    step=waiting,
                    phase="dissemination",
                    algorithm=self.algorithm,
                    collective=self.collective,
                )
            )
        ]

    def _advance(self) -> list[Action]:
        """Send every round whose predecessor is complete; complete after the last."""
        actions: list[Action] = []
        while self._sent < self._rounds and (
            self._sent == 0 or self._state[self._sent - 1] == _DONE
        ):
            to = (self.rank + (1 << self._sent)) % self.world
            actions.append(Send(to, self._sent, 0, _EMPTY))
            self._sent += 1
        if self._sent == self._rounds and (self._rounds == 0 or self._state[-1] == _DONE):
            self._finished = True
            actions.append(Complete())
        return actions

    def _locate(self, src: int, step: int, chunk: int) -> None:
        """Validate a message name."""
        if self._finished:
            raise ProtocolError(
                f"barrier message (round {step}) from rank {src} after completion", rank=src
            )
        if not self._started:
            raise ProtocolError("barrier message received before start()", rank=src)
        if not 0 <= step < self._rounds or chunk != 0:
            raise ProtocolError(
                f"barrier round {step} chunk {chunk} from rank {src} does not exist "
                f"(rounds 0..{self._rounds - 1}, chunk 0)",
                rank=src,
                step=step,
                chunk=chunk,
            )
        expected = (self.rank - (1 << step)) % self.world
        if src != expected:
            raise ProtocolError(
                f"barrier rank {self.rank} receives round {step} only from rank {expected}, "
                f"got it from rank {src}",
                rank=src,
                step=step,
            )
