"""What the chunked schedules (ring, star, broadcast) share: the reducer and
the lifecycle (started, finished, aborted).

After ``Complete`` or ``Abort`` a schedule is finished: a later message is a
``ProtocolError``, and an abort releases the scratch of every message that was
still pending so nothing keeps the tensor's memory busy.

Agreement (``Schedule.needs_agreement``): over an empty tensor no rank sends
or receives anything, so nothing proves the members agree; a subclass whose
data leaves some rank unheard in other cases too says so itself.
"""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from collnet.algo.actions import Abort, Action, Schedule
from collnet.algo.partition import check_group
from collnet.algo.reducer import ChunkReducer, Token
from collnet.codec.base import Codec
from collnet.errors import CollnetError, ProtocolError

# A message's state, per name, in ``_state``: not seen, buffer handed out, arrived.
IDLE, POSTED, DONE = 0, 1, 2


class ChunkedSchedule(Schedule):
    algorithm: str
    # Per message name (as each schedule keys them): IDLE, POSTED or DONE.
    _state: bytearray

    def __init__(
        self,
        rank: int,
        world: int,
        buf: npt.NDArray[Any],
        op: str | None,
        codec: Codec | None,
        chunk_bytes: int,
    ) -> None:
        check_group(rank, world)
        self.rank = rank
        self.world = world
        self._red = ChunkReducer(buf, op, codec, world, chunk_bytes)
        self._pending: dict[int, Token | None] = {}
        self._started = False
        self._finished = False
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def needs_agreement(self) -> bool:
        # The length is the same on every rank (the digest covers it).
        return self._red.n == 0

    def _abort(self, error: CollnetError) -> list[Action]:
        self._finished = True
        self._aborted = True
        for token in self._pending.values():
            self._red.discard(token)
        self._pending.clear()
        return [Abort(error)]

    @property
    def _kind(self) -> str:
        """What a message is called in errors."""
        return self.algorithm

    def _expect_new(self, key: int, src: int, step: int, chunk: int) -> None:
        """A message name seen before is a ``ProtocolError`` (the caller marks it
        ``POSTED`` once its buffer is ready)."""
        if self._state[key] != IDLE:
            raise ProtocolError(
                f"duplicate {self._kind} message (step {step}, chunk {chunk}) from rank {src}",
                rank=src,
                step=step,
                chunk=chunk,
            )

    def _post(self, key: int, a: int, b: int, nbytes: int, combine: bool) -> memoryview:
        """Hand out where message ``key`` (``nbytes`` for elements ``[a, b)``) lands:
        scratch for a contribution to ``combine``, else the result's place; mark
        it ``POSTED``."""
        red = self._red
        if combine:
            view, token = red.contribution_buffer(a, b, nbytes)
            self._pending[key] = token
        else:
            view, rtoken = red.result_buffer(a, b, nbytes)
            self._pending[key] = rtoken
        self._state[key] = POSTED
        return view

    def _arrive(self, key: int, src: int, step: int, chunk: int) -> None:
        """Mark message ``key`` arrived; unless it was announced, a ``ProtocolError``."""
        if self._state[key] != POSTED:
            what = "duplicate" if self._state[key] == DONE else "unannounced"
            raise ProtocolError(
                f"{what} {self._kind} message (step {step}, chunk {chunk}) from rank {src}",
                rank=src,
                step=step,
                chunk=chunk,
            )
        self._state[key] = DONE

    def _check_live(self, src: int, step: int, chunk: int) -> None:
        """Refuse a message before ``start()`` or after the schedule finished."""
        if self._finished:
            raise ProtocolError(
                f"{self.algorithm} message (step {step}, chunk {chunk}) from rank {src} "
                "after completion",
                rank=src,
            )
        if not self._started:
            raise ProtocolError(f"{self.algorithm} message received before start()", rank=src)
