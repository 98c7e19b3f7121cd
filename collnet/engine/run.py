"""One collective in flight on one peer, as a pure machine around its schedule.

A ``Run`` adds to a sans-I/O ``Schedule`` what the schedule does not know:
the collective's name ``(epoch, tag)`` and world, its members' ids, the
digest every peer must agree on, the reassembly of striped pieces into
messages, and which peers may still be writing into the caller's buffer.

Invariants:
- a run ends exactly once, with ``Finished`` or ``Failed``; after that it
  emits nothing more;
- every byte written into the caller's buffer goes through ``sink``, which
  counts the piece as *writing* until ``piece_done``: a failed run's buffer
  goes back to its owner only once nothing is writing (``settled``);
- a message reaches its schedule (``on_receive``) only once all its pieces
  have arrived, whatever order the striped connections delivered them in.
"""

from __future__ import annotations

from dataclasses import dataclass

from collnet.algo.actions import Abort, Action, Complete, Schedule, Send
from collnet.engine.actions import EngineAction, Failed, Finished, Transmit
from collnet.errors import CollnetError, MismatchError, ProtocolError
from collnet.membership.world import WorldView
from collnet.wire.datalink import DataPiece, Key, data_head


@dataclass(slots=True)
class _Inbound:
    view: memoryview
    remaining: int


class Run:
    """Collective ``key`` among ``world``, seen from ``rank``; see the module docstring."""

    def __init__(
        self, key: Key, world: WorldView, rank: int, schedule: Schedule, digest: int
    ) -> None:
        self.key = key
        self.world = world
        self.rank = rank
        self.schedule = schedule
        self.digest = digest
        # Looked up for every piece: a dict, not a scan of the member list.
        self.ranks = {peer.id: r for r, peer in enumerate(world.peers)}
        self.error: CollnetError | None = None
        self.completed = False
        # The schedule itself gave up (this rank's data cannot be encoded): the
        # other members do not know yet.
        self.gave_up = False
        self._inbound: dict[tuple[int, int, int], _Inbound] = {}
        # Pieces whose destination was handed out and that have not fully
        # arrived, per sending peer.
        self._writing: dict[str, int] = {}

    @property
    def done(self) -> bool:
        return self.completed or self.error is not None

    @property
    def settled(self) -> bool:
        return not self._writing

    def writing(self) -> list[str]:
        """Peers that may still write into this run's buffer."""
        return sorted(self._writing)

    def others(self) -> list[str]:
        """Every member but this peer."""
        return [peer.id for r, peer in enumerate(self.world.peers) if r != self.rank]

    def start(self) -> list[EngineAction]:
        return self._translate(self.schedule.start())

    def sink(self, src: int, piece: DataPiece, nbytes: int) -> memoryview:
        """Where ``nbytes`` of ``piece`` from rank ``src`` go (counted as writing)."""
        if piece.digest != self.digest:
            raise MismatchError(
                f"collective {self.key}: peer rank {src} runs a different collective "
                "(shape, dtype, op, codec or algorithm differ)",
                epoch=self.key[0],
                tag=self.key[1],
                peer=self.world.peers[src].id,
            )
        name = (src, piece.step, piece.chunk)
        slot = self._inbound.get(name)
        if slot is None:
            view = self.schedule.recv_buffer(src, piece.step, piece.chunk, piece.total)
            slot = self._inbound[name] = _Inbound(view, piece.total)
        offset = piece.offset
        if offset < 0 or offset + nbytes > piece.total:
            raise ProtocolError(
                f"piece [{offset}, {offset + nbytes}) outside message of {piece.total}"
            )
        peer = self.world.peers[src].id
        self._writing[peer] = self._writing.get(peer, 0) + 1
        return slot.view[offset : offset + nbytes]

    def piece_done(self, peer: str, all_of_them: bool = False) -> bool:
        """A piece from ``peer`` has landed (``all_of_them``: its link is gone, so
        nothing more from it will); True if that settled the run."""
        if peer not in self._writing:
            return False
        left = 0 if all_of_them else self._writing[peer] - 1
        if left > 0:
            self._writing[peer] = left
            return False
        del self._writing[peer]
        return not self._writing

    def received(self, src: int, piece: DataPiece, nbytes: int) -> list[EngineAction]:
        """``nbytes`` of ``piece`` have landed; the schedule hears of whole messages."""
        name = (src, piece.step, piece.chunk)
        slot = self._inbound.get(name)
        if slot is None:
            raise ProtocolError(f"collective {self.key}: piece of unannounced message")
        slot.remaining -= nbytes
        if slot.remaining > 0:
            return []
        del self._inbound[name]
        return self._translate(self.schedule.on_receive(src, piece.step, piece.chunk))

    def fail(self, error: CollnetError) -> list[EngineAction]:
        if self.done:
            return []
        self.error = error
        return [Failed(self.key, error)]

    def _translate(self, actions: list[Action]) -> list[EngineAction]:
        out: list[EngineAction] = []
        for action in actions:
            if self.done:
                break
            if type(action) is Send:
                head = data_head(self.key, action.step, action.chunk, self.digest)
                out.append(Transmit(self.key, action.to, head, action.payload))
            elif isinstance(action, Complete):
                self.completed = True
                out.append(Finished(self.key))
            elif isinstance(action, Abort):
                self.gave_up = not self.done
                out.extend(self.fail(action.error))
        return out
