"""Broadcast from ``root`` as a pipelined tree: a chain for large tensors, a star for small.

The tensor is cut into chunks (one segment, as in ``star``). Every non-root
rank has one parent, from which it receives each chunk once, and forwards
each chunk to its children as soon as it has arrived:

- ``chain``: ranks in ring order from the root, ``root, root + 1, ...``;
  each receives from the previous one and forwards to the next. Every link
  carries the tensor once, so for large tensors the time is about one
  tensor's transfer plus ``W - 2`` chunks of pipeline fill: bandwidth-optimal;
- ``star``: the root sends every chunk to every other rank directly; one
  hop, but the root sends ``W - 1`` copies: for small tensors, where latency
  dominates (``select.make_broadcast`` chooses like the all-reduce's auto).

A message is named by ``(step, chunk)`` where ``step`` is the hop: the
receiver's distance from the root minus one (chain), always 0 (star).

Zero-copy invariant (raw path): the root sends views of its tensor and never
writes it; a non-root's chunk lands straight in its tensor, is forwarded as a
view of it, and is never written again.

Bit-identity with a quantizing codec (float dtypes only): the root encodes
each chunk once, replaces its own copy with the decode of those bytes, and
every other rank decodes the very same bytes, forwarded unchanged along the
tree, so every rank, the root included, ends with the same tensor.

Failure model: the root's schedule completes once it has handed every chunk
to the executor (its tensor is final from the start); any other rank that is
still receiving aborts with ``PeerLost`` naming its hop when a participant is
lost. The root receives nothing and a rank hears nothing from the ranks
after it in the tree, so none of them knows from the data that everyone
broadcasts the same way: ``needs_agreement`` is True, and the executor
reports success only once every member confirmed the digest (a root that a
member disagrees with fails with ``MismatchError`` like the others).
The tensor of an aborted rank holds the chunks received so far. Unexpected
messages raise ``ProtocolError`` and leave the schedule unfinished (see
``ring`` for the shared rules); a codec that cannot encode the root's data
aborts the root with that ``CodecError``.
"""

from __future__ import annotations

from typing import Any, Final

import numpy.typing as npt

from collnet.algo.actions import Action, Complete, Send
from collnet.algo.chunked import ChunkedSchedule
from collnet.algo.partition import Partition, check_group
from collnet.codec.base import Codec
from collnet.errors import CodecError, InvalidArgument, PeerLost, ProtocolError

BROADCAST_TREES: Final[tuple[str, ...]] = ("chain", "star")


class TreeBroadcast(ChunkedSchedule):
    """Broadcast of ``buf`` from ``root`` along ``tree`` (chain or star), seen from ``rank``.

    ``buf``: 1-D contiguous writable array of any numeric dtype (float32,
    float16 or bfloat16 with a quantizing codec), the same length on every
    rank; the root's holds the data, every rank's holds it after
    ``Complete``. ``codec`` and ``chunk_bytes`` as for ``RingAllReduce``;
    every rank passes the same root, tree, codec and chunk_bytes.
    """

    collective = "broadcast"

    def __init__(
        self,
        rank: int,
        world: int,
        buf: npt.NDArray[Any],
        root: int = 0,
        codec: Codec | None = None,
        chunk_bytes: int = 1 << 20,
        tree: str = "chain",
    ) -> None:
        check_group(rank, world)
        if not 0 <= root < world:
            raise InvalidArgument(f"root {root} outside world of {world}", root=root, world=world)
        if tree not in BROADCAST_TREES:
            raise InvalidArgument(
                f"unknown broadcast tree {tree!r}; expected one of {BROADCAST_TREES}", algo=tree
            )
        super().__init__(rank, world, buf, None, codec, chunk_bytes)
        self.algorithm = tree
        self.root = root
        pos = (rank - root) % world
        self._parent: int | None = None
        self._children: list[int] = []
        if tree == "chain":
            self._hop = pos - 1
            if pos > 0:
                self._parent = (rank - 1) % world
            if pos < world - 1:
                self._children = [(rank + 1) % world]
        else:
            self._hop = 0
            if pos > 0:
                self._parent = root
            else:
                self._children = [r for r in range(world) if r != root]
        self._part = Partition(self._red.n, 1, self._red.chunk_elems)
        self._nchunks = self._part.num_chunks(0)
        self._state = bytearray(self._nchunks)
        self._received = 0

    @property
    def needs_agreement(self) -> bool:
        return True

    @property
    def shares_node_link(self) -> bool:
        # A star's root sends to all W - 1 at once; a chain's links take turns.
        return self.algorithm == "star" and self.world > 2

    def start(self) -> list[Action]:
        if self._started:
            raise ProtocolError("start() called twice")
        self._started = True
        if self.world == 1 or self._nchunks == 0:
            self._finished = True
            return [Complete()]
        if self._parent is not None:
            return []
        part, red = self._part, self._red
        actions: list[Action] = []
        try:
            for c in range(self._nchunks):
                a, b = part.chunk(0, c)
                payload = red.finalize(a, b)
                actions.extend(Send(child, 0, c, payload) for child in self._children)
        except CodecError as exc:
            return self._abort(exc)
        self._finished = True
        actions.append(Complete())
        return actions

    @property
    def _kind(self) -> str:
        return "broadcast"

    def recv_buffer(self, src: int, step: int, chunk: int, nbytes: int) -> memoryview:
        if self._aborted:
            return self._red.sink(nbytes)
        self._locate(src, step, chunk)
        self._expect_new(chunk, src, step, chunk)
        a, b = self._part.chunk(0, chunk)
        self._red.check_nbytes(a, b, nbytes)
        return self._post(chunk, a, b, nbytes, combine=False)

    def on_receive(self, src: int, step: int, chunk: int) -> list[Action]:
        if self._aborted:
            return []
        self._locate(src, step, chunk)
        self._arrive(chunk, src, step, chunk)
        a, b = self._part.chunk(0, chunk)
        token = self._pending.pop(chunk)
        # Undecodable bytes raise ProtocolError here and leave the schedule
        # open, for the executor to drop the link (as in the ring).
        payload = self._red.place(token, a, b, forward=bool(self._children))
        self._received += 1
        actions: list[Action] = []
        if payload is not None:
            actions.extend(Send(child, step + 1, chunk, payload) for child in self._children)
        if self._received == self._nchunks:
            self._finished = True
            actions.append(Complete())
        return actions

    def on_peer_lost(self, rank: int) -> list[Action]:
        if self._finished or not 0 <= rank < self.world:
            return []
        phase = "pipeline" if self.algorithm == "chain" else "fan-out"
        return self._abort(
            PeerLost(
                f"peer rank {rank} lost during {self.algorithm} broadcast from root "
                f"{self.root} step {self._hop} ({phase}); rank {self.rank} had received "
                f"{self._received}/{self._nchunks} chunks",
                rank=rank,
                step=self._hop,
                phase=phase,
                root=self.root,
                algorithm=self.algorithm,
                collective=self.collective,
            )
        )

    def _locate(self, src: int, step: int, chunk: int) -> None:
        """Validate a message name."""
        self._check_live(src, step, chunk)
        # The root never gets here: it is finished from start() on.
        if src != self._parent or step != self._hop:
            raise ProtocolError(
                f"broadcast rank {self.rank} expects step {self._hop} from rank "
                f"{self._parent}, got step {step} from rank {src}",
                rank=src,
                step=step,
            )
        if not 0 <= chunk < self._nchunks:
            raise ProtocolError(
                f"broadcast chunk {chunk} from rank {src} does not exist", rank=src, chunk=chunk
            )
