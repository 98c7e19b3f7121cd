"""RingSim: a fake network that routes actions among N sans-I/O schedules.

Messages are delivered in two stages, like the real transport: *announce*
(the header arrived: ``recv_buffer`` is asked for a buffer) and *fill* (the
payload bytes are copied in, then ``on_receive``). A seeded RNG picks which
pending stage of which message happens next, so messages from different
senders, of different steps and chunks, and even of one link, interleave in
any order (the transport stripes chunks over several TCP connections, so
there is no per-link FIFO).

Payload bytes are read from the sender's memoryview at fill time, not at
send time: a schedule that overwrites bytes it has sent before they were
delivered corrupts the result, and the tests see it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from collnet.algo.actions import Abort, Action, Complete, Schedule, Send
from collnet.algo.direct import DirectAllReduce
from collnet.algo.ring import RingAllReduce
from collnet.algo.star import StarAllReduce
from collnet.codec.base import Codec
from collnet.errors import CodecError, NonFiniteError


@dataclass
class Message:
    src: int
    dst: int
    step: int
    chunk: int
    payload: memoryview
    target: memoryview | None = None


@dataclass
class RingSim:
    """Routes Send actions among ``schedules`` (index = rank) in an RNG-chosen order."""

    schedules: list[Schedule]
    rng: random.Random
    in_flight: list[Message] = field(default_factory=list)
    outcome: dict[int, Complete | Abort] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)
    delivered: int = 0

    def start(self) -> None:
        order = list(range(len(self.schedules)))
        self.rng.shuffle(order)
        for rank in order:
            self.perform(rank, self.schedules[rank].start())

    def perform(self, rank: int, actions: list[Action]) -> None:
        for action in actions:
            assert rank not in self.outcome, f"rank {rank} acted after {self.outcome[rank]}"
            if isinstance(action, Send):
                assert action.to != rank
                self.in_flight.append(
                    Message(rank, action.to, action.step, action.chunk, action.payload)
                )
            else:
                self.outcome[rank] = action
        assert (rank in self.outcome) == self.schedules[rank].finished

    def step(self) -> bool:
        """Advance one random message by one stage; False when nothing is in flight."""
        if not self.in_flight:
            return False
        i = self.rng.randrange(len(self.in_flight))
        msg = self.in_flight[i]
        sched = self.schedules[msg.dst]
        if msg.target is None:
            msg.target = sched.recv_buffer(msg.src, msg.step, msg.chunk, len(msg.payload))
            assert isinstance(msg.target, memoryview)
            assert msg.target.nbytes == len(msg.payload)
            return True
        self.in_flight[i] = self.in_flight[-1]
        self.in_flight.pop()
        msg.target[:] = msg.payload
        self.delivered += 1
        self.perform(msg.dst, sched.on_receive(msg.src, msg.step, msg.chunk))
        return True

    def run(self, max_steps: int | None = None) -> None:
        steps = 0
        while (max_steps is None or steps < max_steps) and self.step():
            steps += 1

    def kill(self, rank: int) -> None:
        """``rank`` dies: it receives nothing more; what it already sent may still arrive."""
        self.dead.add(rank)
        self.in_flight = [m for m in self.in_flight if m.dst != rank]

    def notify_lost(self, survivor: int, lost: int) -> None:
        self.perform(survivor, self.schedules[survivor].on_peer_lost(lost))


class Fp16CastCodec(Codec):
    """Test-only lossy codec: a float16 cast (deterministic, 2 bytes a value)."""

    name = "test-fp16"
    lossy = True

    def encode(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
        with np.errstate(over="ignore"):
            half = x.astype(np.float16)
        if not np.all(np.isfinite(half)):
            raise NonFiniteError("test-fp16: value not representable in float16")
        return half.view(np.uint8)

    def decode(
        self, data: bytes | memoryview | np.ndarray, n: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        raw = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        if raw.shape[0] != 2 * n:
            raise CodecError(f"test-fp16: {raw.shape[0]} bytes cannot hold {n} values")
        if out is None:
            out = np.empty(n, dtype=np.float32)
        out[...] = raw.view(np.float16)
        return out


FP16_TEST = Fp16CastCodec()


def build(
    algo: str,
    inputs: list[np.ndarray],
    op: str,
    codec: Codec | None = None,
    chunk_bytes: int = 1 << 20,
    root: int = 0,
) -> list[Schedule]:
    world = len(inputs)
    if algo == "ring":
        return [RingAllReduce(r, world, inputs[r], op, codec, chunk_bytes) for r in range(world)]
    if algo == "direct":
        return [DirectAllReduce(r, world, inputs[r], op, codec, chunk_bytes) for r in range(world)]
    return [
        StarAllReduce(r, world, inputs[r], op, codec, chunk_bytes, root=root) for r in range(world)
    ]
