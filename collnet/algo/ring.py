"""Pipelined ring all-reduce (reduce-scatter, then all-gather) as a sans-I/O schedule.

Rank ``r`` of ``W`` sends only to ``right = (r + 1) % W`` and receives only
from ``left = (r - 1) % W``. The tensor is cut into ``W`` segments (see
``partition``), each into chunks. At every step ``s`` in ``0 .. 2W - 3``
rank ``r`` sends segment ``(r - s) % W`` and receives segment
``(r - s - 1) % W``:

- steps ``0 .. W - 2`` (reduce-scatter): the received chunk is combined into
  the local one; after step ``W - 2`` rank ``r`` holds the full reduction of
  segment ``(r + 1) % W`` and is its *owner*: the one place where the chunk
  is finalized (avg divide; quantize once), so every rank gets its bytes;
- steps ``W - 1 .. 2W - 3`` (all-gather): the received chunk is final; it is
  installed and forwarded as-is.

``RingSchedule`` runs either phase alone too, over the same code: the
reduce-scatter alone (``reducescatter``, segments shifted so that rank ``r``
owns segment ``r``) and the all-gather alone (``allgather``, over blocks of
given sizes, each rank's own block final from the start).

A message is named by ``(step, chunk)``. The ring is pipelined per chunk:
chunk ``c`` of step ``s + 1`` is the very chunk received as ``(s, c)``, and it
is sent as soon as that one has been received and combined; ``start()`` sends
all chunks of step 0. Messages may arrive in any order (the transport stripes
chunks over several connections); each chunk's chain is independent.

Zero-copy invariant (raw path): sent payloads are views of the caller's
tensor. A chunk's bytes are written again only when the all-gather brings
its final value, and that value exists only after the right neighbour has
consumed this rank's contribution (causality of the ring), so no payload is
overwritten before it is delivered. The executor must still finish sending
every payload before it tells the caller the collective completed.

Failure model: any participant lost before ``Complete`` aborts the schedule
with ``PeerLost``; the tensor's contents after an ``Abort`` are undefined
(partially reduced). Messages that the ring does not expect (wrong sender,
step or chunk, a duplicate, a wrong size, an all-gather chunk ahead of this
rank's own contribution, undecodable bytes) raise ``ProtocolError`` and
leave the schedule unfinished, so the executor can drop the offending link
and report the peer lost. Messages arriving after an ``Abort`` are accepted
into a discard buffer and ignored. A quantizing codec that cannot encode this
rank's own data (``NonFiniteError``: NaN, Inf, out of range) aborts the
schedule with that ``CodecError``; the executor must tell the other ranks.
"""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from collnet.algo.actions import Action, Complete, Send
from collnet.algo.chunked import DONE, ChunkedSchedule
from collnet.algo.partition import Layout, Partition
from collnet.codec.base import Codec
from collnet.errors import CodecError, InvalidArgument, PeerLost, ProtocolError


class RingSchedule(ChunkedSchedule):
    """The ring over ``layout``: a reduce-scatter phase (``reduce``), an
    all-gather phase (``gather``), or both.

    At step ``s`` rank ``r`` sends segment ``(r - s + shift) % W``; after the
    reduce-scatter phase it owns segment ``(r + 1 + shift) % W``. ``op`` is
    None exactly when there is no reduce-scatter phase.
    """

    algorithm = "ring"
    collective = "all-reduce"

    def __init__(
        self,
        rank: int,
        world: int,
        buf: npt.NDArray[Any],
        op: str | None,
        codec: Codec | None,
        chunk_bytes: int,
        *,
        reduce: bool,
        gather: bool,
        shift: int = 0,
        layout: Layout | None = None,
    ) -> None:
        super().__init__(rank, world, buf, op, codec, chunk_bytes)
        part = (
            layout if layout is not None else Partition(self._red.n, world, self._red.chunk_elems)
        )
        if part.n != self._red.n or part.world != world:
            raise InvalidArgument("ring layout does not match the buffer and world")
        self._part: Layout = part
        self._shift = shift
        self._left = (rank - 1) % world
        self._right = (rank + 1) % world
        self._reduce_steps = world - 1 if reduce else 0
        self._nsteps = self._reduce_steps + (world - 1 if gather else 0)
        self._gather = gather
        self._maxc = part.max_chunks()
        # Per (step, chunk) receive state, indexed step * maxc + chunk.
        self._state = bytearray(self._nsteps * self._maxc)
        self._step_done = [0] * self._nsteps
        self._expected = sum(self._chunks_at(s) for s in range(self._nsteps))
        self._received = 0

    def start(self) -> list[Action]:
        if self._started:
            raise ProtocolError("start() called twice")
        self._started = True
        if self.world == 1:
            self._red.finalize_local()
        seg = (self.rank + self._shift) % self.world
        part, red, right = self._part, self._red, self._right
        actions: list[Action] = []
        if self._nsteps:
            # Without a reduce-scatter phase this rank's own segment is final
            # already: its owner quantizes it once, here.
            produce = red.outgoing if self._reduce_steps else red.finalize
            try:
                for c in range(part.num_chunks(seg)):
                    a, b = part.chunk(seg, c)
                    actions.append(Send(right, 0, c, produce(a, b)))
            except CodecError as exc:
                return self._abort(exc)
        if self._expected == 0:
            self._finished = True
            actions.append(Complete())
        return actions

    def recv_buffer(self, src: int, step: int, chunk: int, nbytes: int) -> memoryview:
        if self._aborted:
            return self._red.sink(nbytes)
        key, a, b = self._locate(src, step, chunk)
        self._expect_new(key, src, step, chunk)
        self._red.check_nbytes(a, b, nbytes)
        if step >= self._reduce_steps:
            # The final value of this chunk can only exist once the right
            # neighbour consumed our contribution, sent when (step - W, chunk)
            # arrived; earlier means a broken peer, and writing now would
            # corrupt bytes still to be sent. (Without a reduce-scatter phase
            # no received block is ever sent by this rank before it arrives.)
            before = step - self.world
            if (
                self._reduce_steps
                and before >= 0
                and self._state[before * self._maxc + chunk] != DONE
            ):
                raise ProtocolError(
                    f"all-gather chunk (step {step}, chunk {chunk}) from rank {src} arrived "
                    f"before this rank sent its contribution",
                    rank=src,
                    step=step,
                    chunk=chunk,
                )
        return self._post(key, a, b, nbytes, combine=step < self._reduce_steps)

    def on_receive(self, src: int, step: int, chunk: int) -> list[Action]:
        if self._aborted:
            return []
        key, a, b = self._locate(src, step, chunk)
        self._arrive(key, src, step, chunk)
        token = self._pending.pop(key)
        red = self._red
        last = self._nsteps - 1
        payload: memoryview | None = None
        if step < self._reduce_steps:
            assert token is not None
            red.accumulate(token, a, b)
            try:
                if step < self._reduce_steps - 1:
                    payload = red.outgoing(a, b)
                elif self._gather:
                    payload = red.finalize(a, b)
                else:
                    red.settle(a, b)
            except CodecError as exc:
                return self._abort(exc)
        else:
            payload = red.place(token, a, b, forward=step < last)
        self._step_done[step] += 1
        self._received += 1
        actions: list[Action] = []
        if payload is not None:
            actions.append(Send(self._right, step + 1, chunk, payload))
        if self._received == self._expected:
            self._finished = True
            actions.append(Complete())
        return actions

    def on_peer_lost(self, rank: int) -> list[Action]:
        if self._finished or not 0 <= rank < self.world:
            return []
        step = next(
            (s for s in range(self._nsteps) if self._step_done[s] < self._chunks_at(s)),
            self._nsteps,
        )
        phase = "reduce-scatter" if step < self._reduce_steps else "all-gather"
        return self._abort(
            PeerLost(
                f"peer rank {rank} lost during ring {self.collective} step {step} ({phase}); "
                f"rank {self.rank} had received {self._received}/{self._expected} chunks",
                rank=rank,
                step=step,
                phase=phase,
                algorithm=self.algorithm,
                collective=self.collective,
            )
        )

    # -- helpers ------------------------------------------------------------------

    def _chunks_at(self, step: int) -> int:
        return self._part.num_chunks((self.rank - step - 1 + self._shift) % self.world)

    def _locate(self, src: int, step: int, chunk: int) -> tuple[int, int, int]:
        """Validate a message name; return its state index and element range."""
        self._check_live(src, step, chunk)
        if src != self._left:
            raise ProtocolError(
                f"ring rank {self.rank} receives only from rank {self._left}, got a message "
                f"from rank {src}",
                rank=src,
            )
        if not 0 <= step < self._nsteps:
            raise ProtocolError(
                f"ring step {step} from rank {src} outside 0..{self._nsteps - 1}",
                rank=src,
                step=step,
            )
        seg = (self.rank - step - 1 + self._shift) % self.world
        if not 0 <= chunk < self._part.num_chunks(seg):
            raise ProtocolError(
                f"ring chunk {chunk} of step {step} from rank {src} does not exist",
                rank=src,
                step=step,
                chunk=chunk,
            )
        a, b = self._part.chunk(seg, chunk)
        return step * self._maxc + chunk, a, b


class RingAllReduce(RingSchedule):
    """Ring all-reduce of ``buf`` in place, seen from ``rank``.

    ``buf``: 1-D contiguous writable array of float32, float16, bfloat16,
    int32 or int64; it holds the result after ``Complete``. ``op``: sum, avg,
    min, max or prod. ``codec``: None (or a codec named ``"none"``) for exact
    transfer; a quantizing codec for the float32-accumulating quantized path.
    ``chunk_bytes``: pipelining granularity in tensor bytes (at least one
    element a chunk). Every rank must pass the same length, dtype, op, codec
    and chunk_bytes.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        buf: npt.NDArray[Any],
        op: str,
        codec: Codec | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        super().__init__(rank, world, buf, op, codec, chunk_bytes, reduce=True, gather=True)

    @property
    def needs_agreement(self) -> bool:
        # With fewer elements than ranks some segments are empty: their owners
        # send nothing at start and some ranks complete without word from all.
        # The length is the same on every rank (the digest covers it).
        return self._red.n < self.world
