"""Star all-reduce through one root: latency-optimal for small tensors.

Two message steps, each chunked like the whole tensor (one segment):

- step 0: every non-root sends all its chunks to ``root`` (encoded when
  quantized);
- step 1: once all ``W - 1`` contributions to chunk ``c`` have arrived, the
  root combines them into its own chunk in rank order (so the result does not
  depend on arrival order), finalizes it (avg divide; quantize once and
  replace its own chunk with the decode of those bytes) and sends that one
  payload to every non-root, which installs it (directly into the tensor on
  the raw path; by decoding the very same bytes on the quantized path).

Every rank therefore ends with the root's bytes: results are bit-identical.
Each round trip costs two hops whatever ``W`` is, but the root moves
``(W - 1)`` tensors each way and holds up to ``W - 1`` chunk contributions
per chunk in flight, so the star is for small tensors.

Zero-copy invariant (raw path): sent payloads are views of the tensor; a
non-root's chunk is overwritten only by the result, which exists only after
the root consumed its contribution; the root never writes a chunk after
sending it. The tensor's contents after an ``Abort`` are undefined.
Unexpected messages raise ``ProtocolError`` and leave the schedule
unfinished; a codec that cannot encode local data aborts with its
``CodecError`` (see ``ring`` for the shared failure model).
"""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from collnet.algo.actions import Action, Complete, Send
from collnet.algo.chunked import ChunkedSchedule
from collnet.algo.partition import Partition, check_group
from collnet.codec.base import Codec
from collnet.errors import CodecError, InvalidArgument, PeerLost, ProtocolError

STEP_CONTRIBUTE = 0
STEP_RESULT = 1


class StarAllReduce(ChunkedSchedule):
    """Star all-reduce of ``buf`` in place through ``root``, seen from ``rank``.

    Arguments as for ``RingAllReduce``, plus ``root``: the rank that combines
    (every rank must pass the same one).
    """

    algorithm = "star"

    def __init__(
        self,
        rank: int,
        world: int,
        buf: npt.NDArray[Any],
        op: str,
        codec: Codec | None = None,
        chunk_bytes: int = 1 << 20,
        root: int = 0,
    ) -> None:
        check_group(rank, world)
        if not 0 <= root < world:
            raise InvalidArgument(f"root {root} outside world of {world}", root=root, world=world)
        super().__init__(rank, world, buf, op, codec, chunk_bytes)
        self.root = root
        self._is_root = rank == root
        self._part = Partition(self._red.n, 1, self._red.chunk_elems)
        self._nchunks = self._part.num_chunks(0)
        # Root: state per (src, chunk) at src * nchunks + chunk; others: per chunk.
        self._state = bytearray((world if self._is_root else 1) * self._nchunks)
        self._arrived = [0] * self._nchunks if self._is_root else []
        self._chunks_done = 0

    @property
    def shares_node_link(self) -> bool:
        # The root hears from, and sends to, all W - 1 at once.
        return self.world > 2

    def start(self) -> list[Action]:
        if self._started:
            raise ProtocolError("start() called twice")
        self._started = True
        if self.world == 1:
            self._red.finalize_local()
        if self.world == 1 or self._nchunks == 0:
            self._finished = True
            return [Complete()]
        if self._is_root:
            return []
        part, red, root = self._part, self._red, self.root
        actions: list[Action] = []
        try:
            for c in range(self._nchunks):
                a, b = part.chunk(0, c)
                actions.append(Send(root, STEP_CONTRIBUTE, c, red.outgoing(a, b)))
        except CodecError as exc:
            return self._abort(exc)
        return actions

    def recv_buffer(self, src: int, step: int, chunk: int, nbytes: int) -> memoryview:
        if self._aborted:
            return self._red.sink(nbytes)
        key = self._locate(src, step, chunk)
        self._expect_new(key, src, step, chunk)
        a, b = self._part.chunk(0, chunk)
        self._red.check_nbytes(a, b, nbytes)
        return self._post(key, a, b, nbytes, combine=self._is_root)

    def on_receive(self, src: int, step: int, chunk: int) -> list[Action]:
        if self._aborted:
            return []
        key = self._locate(src, step, chunk)
        self._arrive(key, src, step, chunk)
        a, b = self._part.chunk(0, chunk)
        red = self._red
        actions: list[Action] = []
        if self._is_root:
            self._arrived[chunk] += 1
            if self._arrived[chunk] < self.world - 1:
                return actions
            n = self._nchunks
            for peer in range(self.world):
                if peer != self.rank:
                    token = self._pending.pop(peer * n + chunk)
                    assert token is not None
                    red.accumulate(token, a, b)
            try:
                payload = red.finalize(a, b)
            except CodecError as exc:
                return self._abort(exc)
            for peer in range(self.world):
                if peer != self.rank:
                    actions.append(Send(peer, STEP_RESULT, chunk, payload))
        else:
            red.place(self._pending.pop(key), a, b, forward=False)
        self._chunks_done += 1
        if self._chunks_done == self._nchunks:
            self._finished = True
            actions.append(Complete())
        return actions

    def on_peer_lost(self, rank: int) -> list[Action]:
        if self._finished or not 0 <= rank < self.world:
            return []
        phase = "combine at root" if self._is_root else "waiting for root"
        return self._abort(
            PeerLost(
                f"peer rank {rank} lost during star all-reduce (root {self.root}, {phase}); "
                f"rank {self.rank} had finished {self._chunks_done}/{self._nchunks} chunks",
                rank=rank,
                root=self.root,
                algorithm=self.algorithm,
            )
        )

    def _locate(self, src: int, step: int, chunk: int) -> int:
        """Validate a message name; return its state index."""
        self._check_live(src, step, chunk)
        if self._is_root:
            if not (0 <= src < self.world and src != self.rank and step == STEP_CONTRIBUTE):
                raise ProtocolError(
                    f"star root {self.rank} expects step {STEP_CONTRIBUTE} from other ranks, "
                    f"got step {step} from rank {src}",
                    rank=src,
                    step=step,
                )
        elif src != self.root or step != STEP_RESULT:
            raise ProtocolError(
                f"star rank {self.rank} expects step {STEP_RESULT} from root {self.root}, "
                f"got step {step} from rank {src}",
                rank=src,
                step=step,
            )
        if not 0 <= chunk < self._nchunks:
            raise ProtocolError(
                f"star chunk {chunk} from rank {src} does not exist", rank=src, chunk=chunk
            )
        return src * self._nchunks + chunk if self._is_root else chunk
