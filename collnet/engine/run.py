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
  have arrived, whatever order the striped connections delivered them in;
- it reports ``Finished`` only once it knows every member runs the same
  collective: every message it accepted carried its digest, and where the
  schedule's data alone does not prove the others agreed
  (``needs_agreement``: a broadcast's root hears from nobody) it sends an
  AGREE at start to every other member and finishes only once the AGREE of
  each member has come. A member that disagrees meets a foreign digest and
  every member fails with ``MismatchError``: none of them completes. Every
  member sends every other something at start (data or AGREE), so a
  disagreement is seen one hop after the members started, on both sides of
  it;
- a finished run has consumed every piece addressed to this peer, AGREEs
  included (it waited for each of them), so nothing of it arrives later to
  be stashed as early data for a start that will never come, and its key
  may be used again. (An AGREE sent only to members that got no data at
  start would break this: data proving agreement can finish the run before
  that member's AGREE, sent earlier on another connection, lands.)
"""

from __future__ import annotations

from dataclasses import dataclass

from collnet.algo.actions import Abort, Action, Complete, Schedule, Send
from collnet.engine.actions import EngineAction, Failed, Finished, Transmit
from collnet.errors import CollnetError, MismatchError, ProtocolError
from collnet.membership.world import WorldView
from collnet.wire.datalink import AGREE_STEP, DataPiece, Key, data_head

# What an AGREE carries (nothing) and where its nothing lands (writable, as the
# early stash's replay copies into it).
_NOTHING = memoryview(bytearray())


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
        # The schedule completed (its data is in the caller's buffer) but a
        # member's AGREE may still be missing.
        self._schedule_done = False
        self._agree = schedule.needs_agreement and world.size > 1
        # How every data message goes out (Transmit.fan, Transmit.timed).
        self._fan = schedule.fan
        self._timed = not schedule.shares_node_link
        # Ranks whose AGREE came (one each).
        self._agrees: set[int] = set()
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

    def unconfirmed(self) -> list[int]:
        """Ranks this run still waits to hear from (none unless it needs agreement)."""
        if not self._agree:
            return []
        return [r for r in range(self.world.size) if r != self.rank and r not in self._agrees]

    def start(self) -> list[EngineAction]:
        out = self._translate(self.schedule.start())
        if self._agree and self.error is None:
            # Every other member gets one, those sent data now too: each
            # waits for every AGREE, so none lands after its run finished (see
            # the module docstring). After the data: it is what the far end
            # waits for first.
            head = data_head(self.key, AGREE_STEP, 0, self.digest)
            out += [
                Transmit(self.key, r, head, _NOTHING)
                for r in range(self.world.size)
                if r != self.rank
            ]
        return out

    def sink(self, src: int, piece: DataPiece, nbytes: int) -> memoryview:
        """Where ``nbytes`` of ``piece`` from rank ``src`` go (counted as writing)."""
        if piece.digest != self.digest:
            raise MismatchError(
                f"collective {self.key}: peer rank {src} runs a different collective "
                "(shape, dtype, root, op, codec or algorithm differ)",
                epoch=self.key[0],
                tag=self.key[1],
                peer=self.world.peers[src].id,
            )
        if piece.step == AGREE_STEP:
            return self._agreement(src, piece, nbytes)
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
        if piece.step == AGREE_STEP:
            return self._finish()
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
                out.append(
                    Transmit(self.key, action.to, head, action.payload, self._fan, self._timed)
                )
            elif isinstance(action, Complete):
                self._schedule_done = True
                out.extend(self._finish())
            elif isinstance(action, Abort):
                self.gave_up = not self.done
                out.extend(self.fail(action.error))
        return out

    def _agreement(self, src: int, piece: DataPiece, nbytes: int) -> memoryview:
        """Rank ``src``'s AGREE (its digest matched): counted, and nothing to place.

        One from a member of a collective that does not need them is harmless
        (its digest matched) and only counted too."""
        if piece.chunk != 0 or piece.offset != 0 or piece.total != 0 or nbytes != 0:
            raise ProtocolError(
                f"collective {self.key}: malformed AGREE from rank {src} "
                f"(chunk {piece.chunk}, {piece.total} bytes)"
            )
        if src in self._agrees:
            raise ProtocolError(f"collective {self.key}: second AGREE from rank {src}")
        self._agrees.add(src)
        peer = self.world.peers[src].id
        # Counted like any piece, so that its ``piece_done`` balances.
        self._writing[peer] = self._writing.get(peer, 0) + 1
        return _NOTHING

    def _finish(self) -> list[EngineAction]:
        """``Finished`` once the schedule completed and every member was heard from."""
        if self.done or not self._schedule_done or self.unconfirmed():
            return []
        self.completed = True
        return [Finished(self.key)]
