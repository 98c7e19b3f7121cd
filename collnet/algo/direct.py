"""Direct all-reduce: every rank owns one segment and talks to every other rank.

A reduce-scatter and an all-gather in one hop each, instead of the ring's
``W - 1`` hops each; the bytes a rank sends and receives are the ring's
(``2 (W - 1) / W`` of the tensor each way), so on links where latency
dominates (long round trips, a pipeline too short to fill them) it takes two
one-way delays where the ring takes ``2 (W - 1)``. It is a star per segment:

- step 0: rank ``r`` sends every chunk of segment ``s`` to rank ``s``, for
  every ``s != r`` (encoded when quantized);
- step 1: the owner combines the ``W - 1`` contributions to chunk ``c`` of its
  own segment into its own chunk in a fixed order (its left neighbour's
  first, then the next one to the left: the order they usually arrive in),
  each as soon as those before it are in, so the result does not depend on
  arrival order; after the last one it finalizes the chunk (avg divide;
  quantize once and keep the decode of those bytes) and sends that one
  payload to every other rank, which installs it (into the tensor on the raw
  path; by decoding those very bytes on the quantized path).

Every rank ends with each owner's bytes: results are bit-identical. A message
is named by ``(step, chunk)`` and its sender: a contribution's segment is the
receiver's own, a result's segment is the sender's. The owner holds a
contribution that arrived ahead of its turn until its turn comes: up to
``(W - 2) / W`` of the tensor at worst (the star's root holds ``W - 1``
tensors), usually a few chunks.

Zero-copy invariant (raw path): sent payloads are views of the tensor; a
chunk this rank contributed is overwritten only by its result, which exists
only after its owner consumed this rank's contribution; an owner never writes
a chunk after sending it. Failure model as ``ring`` and ``star``.
"""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from collnet.algo.actions import Action, Complete, Send
from collnet.algo.chunked import DONE, ChunkedSchedule
from collnet.algo.partition import Partition
from collnet.codec.base import Codec
from collnet.errors import CodecError, PeerLost, ProtocolError

STEP_CONTRIBUTE = 0
STEP_RESULT = 1


class DirectAllReduce(ChunkedSchedule):
    """Direct all-reduce of ``buf`` in place, seen from ``rank``; arguments as for
    ``RingAllReduce``."""

    algorithm = "direct"

    def __init__(
        self,
        rank: int,
        world: int,
        buf: npt.NDArray[Any],
        op: str,
        codec: Codec | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        super().__init__(rank, world, buf, op, codec, chunk_bytes)
        self._part = Partition(self._red.n, world, self._red.chunk_elems)
        self._stride = self._part.max_chunks()
        # Per (step, src, chunk) at (step * world + src) * stride + chunk: a
        # contribution to the own segment from src, or a result of src's.
        self._state = bytearray(2 * world * self._stride)
        own = self._part.num_chunks(rank)
        # Contributions are combined in this fixed order as soon as each one's
        # predecessors are in, so the result does not depend on arrival order
        # and few wait in scratch; it is the order they usually arrive in
        # (every rank sends to its right neighbour first).
        self._order = [(rank - i) % world for i in range(1, world)]
        self._combined = [0] * own
        self._left = own + sum(self._part.num_chunks(s) for s in range(world) if s != rank)

    @property
    def needs_agreement(self) -> bool:
        # With fewer elements than ranks some segments are empty: a rank that
        # owns the only data ones sends nothing at start, and an empty owner is
        # sent nothing, so a disagreeing member could go unmet. (The digest
        # covers the length, so this is alike on every rank.)
        return self._red.n < self.world

    @property
    def fan(self) -> int:
        # Every rank sends its segments to all the others at once, and hears
        # from all of them: W - 1 links share each node's access link.
        return max(1, self.world - 1)

    def start(self) -> list[Action]:
        if self._started:
            raise ProtocolError("start() called twice")
        self._started = True
        if self.world == 1:
            self._red.finalize_local()
        if self.world == 1 or self._left == 0:
            self._finished = True
            return [Complete()]
        part, red = self._part, self._red
        actions: list[Action] = []
        # Owners in turn from the right neighbour, so that each rank's first
        # chunks go to a different peer and no owner is everyone's first.
        owners = [(self.rank + i) % self.world for i in range(1, self.world)]
        try:
            for c in range(self._stride):
                for s in owners:
                    if c < part.num_chunks(s):
                        a, b = part.chunk(s, c)
                        actions.append(Send(s, STEP_CONTRIBUTE, c, red.outgoing(a, b)))
        except CodecError as exc:
            return self._abort(exc)
        return actions

    def recv_buffer(self, src: int, step: int, chunk: int, nbytes: int) -> memoryview:
        if self._aborted:
            return self._red.sink(nbytes)
        key, a, b = self._locate(src, step, chunk)
        self._expect_new(key, src, step, chunk)
        self._red.check_nbytes(a, b, nbytes)
        return self._post(key, a, b, nbytes, combine=step == STEP_CONTRIBUTE)

    def on_receive(self, src: int, step: int, chunk: int) -> list[Action]:
        if self._aborted:
            return []
        key, a, b = self._locate(src, step, chunk)
        self._arrive(key, src, step, chunk)
        red = self._red
        actions: list[Action] = []
        if step == STEP_CONTRIBUTE:
            done = self._combined[chunk]
            while done < self.world - 1:
                key = self._key(STEP_CONTRIBUTE, self._order[done], chunk)
                if self._state[key] != DONE:
                    break
                token = self._pending.pop(key)
                assert token is not None
                red.accumulate(token, a, b)
                done += 1
            self._combined[chunk] = done
            if done < self.world - 1:
                return actions
            try:
                payload = red.finalize(a, b)
            except CodecError as exc:
                return self._abort(exc)
            for i in range(1, self.world):
                actions.append(Send((self.rank + i) % self.world, STEP_RESULT, chunk, payload))
        else:
            red.place(self._pending.pop(key), a, b, forward=False)
        self._left -= 1
        if self._left == 0:
            self._finished = True
            actions.append(Complete())
        return actions

    def on_peer_lost(self, rank: int) -> list[Action]:
        if self._finished or not 0 <= rank < self.world:
            return []
        return self._abort(
            PeerLost(
                f"peer rank {rank} lost during direct all-reduce; rank {self.rank} had "
                f"{self._left} chunks left",
                rank=rank,
                algorithm=self.algorithm,
            )
        )

    def _locate(self, src: int, step: int, chunk: int) -> tuple[int, int, int]:
        """Validate a message name; return its state index and element range."""
        self._check_live(src, step, chunk)
        if not (0 <= src < self.world and src != self.rank):
            raise ProtocolError(f"direct message from rank {src}, not a peer", rank=src)
        if step not in (STEP_CONTRIBUTE, STEP_RESULT):
            raise ProtocolError(f"direct step {step} from rank {src} does not exist", rank=src)
        segment = self.rank if step == STEP_CONTRIBUTE else src
        if not 0 <= chunk < self._part.num_chunks(segment):
            raise ProtocolError(
                f"direct chunk {chunk} of segment {segment} from rank {src} does not exist",
                rank=src,
                chunk=chunk,
            )
        a, b = self._part.chunk(segment, chunk)
        return self._key(step, src, chunk), a, b

    def _key(self, step: int, src: int, chunk: int) -> int:
        return (step * self.world + src) * self._stride + chunk
