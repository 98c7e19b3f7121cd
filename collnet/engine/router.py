"""The collective router of one peer: every data-plane event meets its collective here.

A pure machine: events in (a local collective starts, a DATA piece is
announced or has landed, an ABORT arrives, a link or a member is lost, a
deadline passes, a trainer cancels), actions out (``collnet.engine.actions``).
It is the one owner of the failure path of collectives: every way a
collective can fail passes through ``_fail`` and, where the other members
must hear of it, ``_abort_everywhere``, the only place that addresses ABORT
messages for running collectives.

Failure model:
- a member lost mid-collective (its link broke, or the coordinator's verdict
  removed it) fails every running collective it takes part in with the
  schedule's own ``PeerLost`` (which step, which phase), named for the peer,
  the epoch and the tag; a broken link is seen only by its two ends, so the
  other members are told with an ABORT;
- an ABORT from a member fails the collective with the sender's error
  (``MismatchError`` and ``PeerLost`` as they are, anything else as
  ``CollectiveAborted``); an ABORT for a collective not started here is kept
  (bounded) and fails it at start, if the sender is a member of its world;
- a collective that failed here is remembered (bounded): its late pieces are
  read and dropped and their sender is told once with an ABORT (it missed the
  failure, say it was frozen); a new run under the same key fails at once. A
  completed collective needs no record: it consumed every message addressed
  to this peer, so its key may be used again (a new trainer session restarts
  its tags).

Pieces may arrive before their collective starts here (a faster peer began
first): they are read into a stash (``collnet.engine.early``) that charges
each piece what it really holds, per sending peer and in total, and replayed
at start. The router knows the world this peer holds (``world_is``), which
bounds what it keeps for collectives not started here: a key of an older
epoch can never start here (its pieces are read and dropped, its early
ABORTs ignored), and in the current epoch only members may send any.
Errors that arrive in ABORTs are kept in a compact copy, so what a remote
party makes this peer remember is small.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TypeVar

from collnet.algo.actions import Abort
from collnet.engine.actions import (
    AbortedEarly,
    EngineAction,
    SendAbort,
    Settled,
)
from collnet.engine.early import EarlyBuffer, EarlyStash
from collnet.engine.run import Run
from collnet.errors import (
    CollectiveAborted,
    CollnetError,
    MismatchError,
    PeerLost,
    ProtocolError,
    Timeout,
)
from collnet.membership.world import WorldView
from collnet.wire.datalink import AbortMessage, DataPiece, Key

log = logging.getLogger(__name__)

V = TypeVar("V")

# Bounds of what the router remembers of collectives that are not running.
MAX_REMEMBERED = 4096
# Of an error that came in an ABORT, what is kept.
MAX_REMOTE_MESSAGE_CHARS = 1000
MAX_REMOTE_FIELDS = 16


class _Discarded(bytearray):
    """Bytes of a piece nobody wants (its collective failed here): read and dropped.

    Marked so that their landing is not mistaken for one of the pieces a
    failed collective is still waiting to settle."""


def _compact(error: CollnetError) -> CollnetError:
    """``error`` as it came from a remote party, cut to a size worth remembering."""
    fields = {
        k: v
        for k, v in list(error.fields.items())[:MAX_REMOTE_FIELDS]
        if isinstance(k, str)
        and len(k) <= 64
        and (
            v is None or isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= 256)
        )
    }
    message = error.message[:MAX_REMOTE_MESSAGE_CHARS]
    if message is error.message and fields == error.fields:
        return error  # already small: the common case costs no copy
    return type(error)(message, buffer_modified=error.buffer_modified, **fields)


def _remember(cache: OrderedDict[Key, V], key: Key, value: V) -> None:
    cache[key] = value
    while len(cache) > MAX_REMEMBERED:
        cache.popitem(last=False)


class Router:
    """Routes one peer's data-plane events to its collectives; see the module docstring."""

    def __init__(
        self, me: str, max_early_bytes: int = 1 << 30, max_early_bytes_per_peer: int | None = None
    ) -> None:
        self.me = me
        self.runs: dict[Key, Run] = {}
        self.early = EarlyStash(max_early_bytes, max_early_bytes_per_peer)
        # The world this peer holds (epoch 0: none yet, so every key is "later").
        self.world = WorldView(0, ())
        self._failed: OrderedDict[Key, CollnetError] = OrderedDict()
        # ABORTs for collectives not started here yet, with their sender.
        self._early_aborts: OrderedDict[Key, tuple[str, CollnetError]] = OrderedDict()
        # Failed runs whose in-flight pieces have not landed yet.
        self._settling: dict[Key, Run] = {}
        self._told: OrderedDict[tuple[str, Key], None] = OrderedDict()

    @property
    def early_bytes(self) -> int:
        """What the early pieces held here cost (payload and overhead)."""
        return self.early.total

    # -- queries -----------------------------------------------------------
    def failed(self, key: Key) -> CollnetError | None:
        return self._failed.get(key)

    def aborted_early(self, key: Key, world: WorldView) -> CollnetError | None:
        """The error of an ABORT a member of ``world`` sent before ``key`` started here."""
        aborted = self._early_aborts.get(key)
        if aborted is not None and world.rank_of(aborted[0]) is not None:
            return aborted[1]
        return None

    def settling(self, key: Key) -> bool:
        """True while pieces may still land in failed collective ``key``'s buffer."""
        return key in self._settling

    def still_writing(self, key: Key) -> list[str]:
        """Peers whose pieces may still land in failed collective ``key``'s buffer."""
        run = self._settling.get(key)
        return [] if run is None else run.writing()

    # -- local events ------------------------------------------------------
    def start(self, run: Run) -> list[EngineAction]:
        """Run ``run`` from now on (or fail it at once, if it failed here before)."""
        key = run.key
        if key in self.runs:
            raise ProtocolError(f"collective {key} is already running")
        prior = self._failed.get(key)
        aborted = self._early_aborts.pop(key, None)
        if prior is None and aborted is not None and run.ranks.get(aborted[0]) is not None:
            prior = aborted[1]
        items = self.early.take(key)
        if prior is not None:
            # Failed like any other: the members' pieces still coming are read and
            # dropped, not stashed for a start that will never come.
            _remember(self._failed, key, prior)
            return run.fail(prior)
        self.runs[key] = run
        out = self._after(run, run.start())
        for item in items:
            if run.done:
                break
            out += self._replay(run, item.peer, item.piece, item.payload)
        return out

    def expire(self, key: Key, timeout_s: float) -> list[EngineAction]:
        """Collective ``key`` ran out of time here: it fails on every member."""
        run = self.runs.get(key)
        if run is None:
            return []
        return self._abort_everywhere(
            run,
            Timeout(
                f"collective {key} did not finish within {timeout_s:.1f}s",
                epoch=key[0],
                tag=key[1],
            ),
        )

    def send_failed(self, key: Key, error: CollnetError) -> list[EngineAction]:
        run = self.runs.get(key)
        return [] if run is None else self._fail(run, error)

    def cancel(
        self, key: Key, error: CollnetError, world: WorldView | None
    ) -> tuple[bool, list[EngineAction]]:
        """Abort ``key`` here and on every member; False if it had already failed.

        A collective not started here yet (still linking up) fails the moment it
        starts, and the members of ``world`` (its epoch's world, if known) are
        told now."""
        run = self.runs.get(key)
        if run is not None:
            return True, self._abort_everywhere(run, error)
        if key in self._failed:
            return False, []
        _remember(self._failed, key, error)
        return True, [] if world is None else self.refuse(key, world, error)

    def refuse(self, key: Key, world: WorldView, error: CollnetError) -> list[EngineAction]:
        """This peer will not run ``key`` (its own request was bad): the other
        members of ``world`` hear why now instead of waiting until their deadline."""
        message = AbortMessage(key, error)
        return [SendAbort(peer, message) for peer in world.ids if peer != self.me]

    def members_gone(
        self, peers: set[str] | frozenset[str], reason: str, tell_others: bool = False
    ) -> list[EngineAction]:
        """Fail every running collective that one of ``peers`` takes part in (and,
        ``tell_others``, send its other members an ABORT saying why)."""
        out: list[EngineAction] = []
        for run in list(self.runs.values()):
            for peer in sorted(peers):
                rank = run.ranks.get(peer)
                if rank is None or run.done:
                    continue
                log.warning("collective %s: peer %s lost: %s", run.key, peer, reason)
                error = self._peer_lost(run, peer, rank, reason)
                out += self._abort_everywhere(run, error) if tell_others else self._fail(run, error)
        return out

    def world_is(self, world: WorldView) -> None:
        """This peer now holds ``world``: keys of older epochs can never start here
        (a request for an old epoch is refused), so their early pieces go."""
        if world.epoch < self.world.epoch:
            return
        self.world = world
        self.early.drop_before(world.epoch)

    def fail_all(self, error: CollnetError) -> list[EngineAction]:
        out: list[EngineAction] = []
        for run in list(self.runs.values()):
            out += self._fail(run, error)
        return out

    # -- network events ----------------------------------------------------
    def data_sink(
        self, peer: str, piece: DataPiece, nbytes: int
    ) -> tuple[memoryview, list[EngineAction]]:
        """Where ``nbytes`` of ``piece`` from ``peer`` go."""
        run = self.runs.get(piece.key)
        if run is None:
            failed = self._failed.get(piece.key)
            if failed is not None:
                return memoryview(_Discarded(nbytes)), self._tell_once(peer, piece.key, failed)
            epoch = piece.key[0]
            if epoch < self.world.epoch:
                # Can never start here: read and drop, keep nothing.
                return memoryview(_Discarded(nbytes)), []
            if epoch == self.world.epoch and peer not in self.world.ids:
                raise ProtocolError(f"{peer} sent data for {piece.key} but is not in epoch {epoch}")
            world = self.world
            stranger = peer not in world.ids and peer not in world.pending
            return self.early.reserve(peer, piece, nbytes, stranger).data, []
        src = run.ranks.get(peer)
        if src is None:
            raise ProtocolError(
                f"{peer} sent data for {piece.key} but is not in epoch {piece.key[0]}"
            )
        try:
            return run.sink(src, piece, nbytes), []
        except MismatchError as exc:
            return memoryview(_Discarded(nbytes)), self._abort_everywhere(run, exc)

    def on_data(self, peer: str, piece: DataPiece, payload: memoryview) -> list[EngineAction]:
        """The bytes ``data_sink`` placed have all landed."""
        key = piece.key
        run = self.runs.get(key)
        if isinstance(payload.obj, _Discarded):
            return []
        if isinstance(payload.obj, EarlyBuffer):
            # Read before the collective started here; it may have started (or
            # failed, or the world moved on) while the bytes were arriving, so
            # decide only now.
            if run is not None or key in self._failed or key[0] < self.world.epoch:
                self.early.release(peer, piece, len(payload))
                return [] if run is None else self._replay(run, peer, piece, payload.obj)
            self.early.keep(peer, piece, payload.obj)
            return []
        if run is None:
            zombie = self._settling.get(key)
            if zombie is not None and zombie.piece_done(peer):
                del self._settling[key]
                return [Settled(key)]
            return []
        src = run.ranks.get(peer)
        if src is None:
            return []
        run.piece_done(peer)
        try:
            return self._after(run, run.received(src, piece, len(payload)))
        except CollnetError as exc:
            return self._abort_everywhere(run, exc)

    def on_abort(self, peer: str, message: AbortMessage) -> list[EngineAction]:
        key = message.key
        remote = _compact(message.error)
        if not isinstance(remote, MismatchError | PeerLost):
            remote = CollectiveAborted(
                f"collective {key} aborted by {peer}: {remote.message}", peer=peer
            )
        run = self.runs.get(key)
        if run is not None:
            if run.ranks.get(peer) is None:
                raise ProtocolError(f"{peer} sent ABORT for {key} but is not in epoch {key[0]}")
            return self._fail(run, remote)
        if key in self._failed or key[0] < self.world.epoch:
            return []
        if key[0] == self.world.epoch and peer not in self.world.ids:
            return []  # it could never be honoured (see aborted_early)
        _remember(self._early_aborts, key, (peer, remote))
        return [AbortedEarly(key)]

    def link_lost(self, peer: str, reason: str) -> list[EngineAction]:
        """The link to ``peer`` is gone: nothing more from it lands anywhere."""
        out: list[EngineAction] = []
        for run in self.runs.values():
            run.piece_done(peer, all_of_them=True)
        for key, zombie in list(self._settling.items()):
            if zombie.piece_done(peer, all_of_them=True) or zombie.settled:
                del self._settling[key]
                out.append(Settled(key))
        # Only this peer (and the lost one) saw the link go: the other members
        # of the affected collectives are told, or they would wait for a
        # partner that will never send until their deadline.
        out += self.members_gone({peer}, reason, tell_others=True)
        self.early.drop_peer(peer)
        return out

    # -- the failure path --------------------------------------------------
    def _peer_lost(self, run: Run, peer: str, rank: int, reason: str) -> PeerLost:
        """The schedule's account of losing ``rank`` (step, phase), named for the peer."""
        verdict = run.schedule.on_peer_lost(rank)
        fields = {}
        where = ""
        if verdict and isinstance(verdict[0], Abort):
            fields = dict(verdict[0].error.fields)
            algorithm, step = fields.get("algorithm", "schedule"), fields.get("step")
            if step is not None:
                where = f" ({algorithm} step {step}, {fields.get('phase')})"
            elif "root" in fields:
                where = f" ({algorithm}, root rank {fields['root']})"
        elif rank in run.unconfirmed():
            # The schedule is done here; only this member's AGREE was missing.
            where = " (before it confirmed it runs the same collective)"
        fields.update(peer=peer, rank=rank, epoch=run.key[0], tag=run.key[1])
        return PeerLost(
            f"peer {peer} (rank {rank}) lost during collective {run.key}{where}: {reason}",
            **fields,
        )

    def _abort_everywhere(self, run: Run, error: CollnetError) -> list[EngineAction]:
        """Fail ``run`` here and tell every other member why."""
        if run.done:
            return []
        log.warning("collective %s aborted: %s: %s", run.key, error.kind, error)
        message = AbortMessage(run.key, error)
        out: list[EngineAction] = [SendAbort(peer, message) for peer in run.others()]
        return out + self._fail(run, error)

    def _fail(self, run: Run, error: CollnetError) -> list[EngineAction]:
        return self._after(run, run.fail(error))

    def _after(self, run: Run, actions: list[EngineAction]) -> list[EngineAction]:
        """Bookkeeping once an event has ended ``run``."""
        if not run.done or self.runs.get(run.key) is not run:
            return actions
        del self.runs[run.key]
        if run.error is None:
            return actions
        _remember(self._failed, run.key, run.error)
        if not run.settled:
            self._settling[run.key] = run
        if run.gave_up:
            message = AbortMessage(run.key, run.error)
            actions = [SendAbort(peer, message) for peer in run.others()] + actions
        return actions

    def _replay(
        self, run: Run, peer: str, piece: DataPiece, payload: EarlyBuffer
    ) -> list[EngineAction]:
        src = run.ranks.get(peer)
        if src is None:
            # Bytes from a non-member (a stranger, or a peer of another world) have no
            # place in this collective and must not cost its members the collective.
            log.warning("collective %s: dropped early data from non-member %s", run.key, peer)
            return []
        try:
            view = run.sink(src, piece, len(payload))
            view[:] = payload.data
            run.piece_done(peer)
            return self._after(run, run.received(src, piece, len(payload)))
        except CollnetError as exc:
            return self._abort_everywhere(run, exc)

    def _tell_once(self, peer: str, key: Key, error: CollnetError) -> list[EngineAction]:
        """Answer late data for failed ``key`` with one ABORT per sender."""
        if (peer, key) in self._told:
            return []
        self._told[(peer, key)] = None
        while len(self._told) > MAX_REMEMBERED:
            self._told.popitem(last=False)
        return [SendAbort(peer, AbortMessage(key, error))]
