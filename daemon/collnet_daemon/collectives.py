"""Running collectives over peer links: the executor and the message router.

The router is the one place where data-plane messages meet collectives. A
DATA piece names its collective by ``(epoch, tag)``; the router asks that
collective's schedule where the bytes go, and the kernel writes them there.
Pieces for a collective this daemon has not started yet (a faster peer began
first) are held in a bounded stash and replayed when it starts. Every failure
(a lost link, an ABORT from a peer, a mismatch, a timeout) ends the affected
collectives with a typed error, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collnet.algo.actions import Abort, Action, Complete, Schedule, Send
from collnet.errors import (
    CollectiveAborted,
    CollnetError,
    MismatchError,
    PeerLost,
    ProtocolError,
    Timeout,
)
from collnet.membership import WorldView
from collnet.transport.link import PeerLink
from collnet.wire import Frame, FrameKind
from collnet_daemon.statesync import STATE_DATA, StateSync

log = logging.getLogger(__name__)

Key = tuple[int, int | str]


@dataclass(slots=True)
class _Inbound:
    view: memoryview
    remaining: int


class CollectiveRun:
    """One collective in flight on this daemon."""

    def __init__(
        self,
        key: Key,
        world: WorldView,
        rank: int,
        schedule: Schedule,
        digest: int,
        links: dict[int, PeerLink],
        on_finished: Callable[[CollectiveRun], None],
    ) -> None:
        self.key = key
        self.world = world
        self.rank = rank
        self.schedule = schedule
        self.digest = digest
        self.links = links
        self.on_finished = on_finished
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inbound: dict[tuple[int, int, int], _Inbound] = {}
        self.meta_head: list[Any] = [key[0], key[1], 0, 0, digest]
        self.started_s = time.monotonic()
        # Pieces whose destination view was handed to a connection and that have
        # not fully arrived, per sending peer: until they settle, the kernel may
        # still write into the caller's tensor, even after this run has failed.
        self.writing: dict[str, int] = {}
        self.settled = asyncio.Event()
        self.settled.set()

    @property
    def done(self) -> bool:
        return self.future.done()

    def start(self) -> None:
        self._perform(self.schedule.start())

    def sink(
        self, src: int, step: int, chunk: int, digest: int, offset: int, total: int, nbytes: int
    ) -> memoryview:
        if digest != self.digest:
            raise MismatchError(
                f"collective {self.key}: peer rank {src} runs a different collective "
                "(shape, dtype, op, codec or algorithm differ)",
                epoch=self.key[0],
                tag=self.key[1],
                peer=self.world.peers[src].id,
            )
        slot = self.inbound.get((src, step, chunk))
        if slot is None:
            view = self.schedule.recv_buffer(src, step, chunk, total)
            slot = self.inbound[(src, step, chunk)] = _Inbound(view, total)
        if offset < 0 or offset + nbytes > total:
            raise ProtocolError(f"piece [{offset}, {offset + nbytes}) outside message of {total}")
        peer = self.world.peers[src].id
        self.writing[peer] = self.writing.get(peer, 0) + 1
        self.settled.clear()
        return slot.view[offset : offset + nbytes]

    def piece_done(self, peer: str, all_of_them: bool = False) -> None:
        """A piece from ``peer`` fully arrived (or, ``all_of_them``, its link is gone)."""
        left = 0 if all_of_them else self.writing.get(peer, 0) - 1
        if left > 0:
            self.writing[peer] = left
        else:
            self.writing.pop(peer, None)
        if not self.writing:
            self.settled.set()

    def received(self, src: int, step: int, chunk: int, nbytes: int) -> None:
        slot = self.inbound.get((src, step, chunk))
        if slot is None:
            raise ProtocolError(f"collective {self.key}: piece of unannounced message")
        slot.remaining -= nbytes
        if slot.remaining <= 0:
            del self.inbound[(src, step, chunk)]
            self._perform(self.schedule.on_receive(src, step, chunk))

    def fail(self, exc: CollnetError) -> None:
        if not self.done:
            self.future.set_exception(exc)
            self.on_finished(self)

    def _perform(self, actions: list[Action]) -> None:
        head = self.meta_head
        for action in actions:
            if self.done:
                return
            if isinstance(action, Send):
                head[2] = action.step
                head[3] = action.chunk
                try:
                    self.links[action.to].send_data(head, action.payload)
                except CollnetError as exc:
                    self.fail(exc)
            elif isinstance(action, Complete):
                self.future.set_result(None)
                self.on_finished(self)
            elif isinstance(action, Abort):
                self.fail(action.error)


def _parse_data_meta(meta: Any) -> tuple[Key, int, int, int, int, int]:
    if not isinstance(meta, list) or len(meta) != 7:
        raise ProtocolError(f"bad DATA metadata {meta!r:.80}")
    epoch, tag, step, chunk, digest, offset, total = meta
    if not all(isinstance(v, int) for v in (epoch, step, chunk, digest, offset, total)):
        raise ProtocolError(f"bad DATA metadata {meta!r:.80}")
    if not isinstance(tag, int | str):
        raise ProtocolError(f"bad DATA tag {tag!r:.40}")
    return (epoch, tag), step, chunk, digest, offset, total


class _EarlyBuffer(bytearray):
    """Bytes of a piece that arrived before its collective started here."""


@dataclass(slots=True)
class _Early:
    peer: str
    meta: list[Any]
    payload: bytearray


class Router:
    """Routes DATA/ABORT frames of every link to the collectives; see module docstring."""

    def __init__(self, max_early_bytes: int = 1 << 30) -> None:
        self.runs: dict[Key, CollectiveRun] = {}
        self.early: dict[Key, list[_Early]] = {}
        self.early_bytes = 0
        self.max_early_bytes = max_early_bytes
        # Keys of collectives that failed here: their late pieces are dropped and
        # a new run under the same key fails at once. A completed collective needs
        # no record: it has consumed every message addressed to this peer, so its
        # key may be used again (a new client session restarts its tags).
        self.failed: OrderedDict[Key, CollnetError] = OrderedDict()
        # ABORTs for collectives not started here yet, with their sender: honoured at
        # start only if the sender is a member of that collective's world.
        self.early_aborts: OrderedDict[Key, tuple[str, CollnetError]] = OrderedDict()
        self.on_peer_lost: Callable[[str, CollnetError], None] | None = None
        # Failed runs whose in-flight pieces have not settled yet.
        self.settling: dict[Key, CollectiveRun] = {}
        # Shared-state transfers share the links; their frames go there.
        self.state: StateSync | None = None
        # Sends an ABORT to a peer still sending data for a collective that
        # failed here: it missed the failure (say, it was frozen), and would
        # otherwise wait for its partners until its deadline.
        self.on_late: Callable[[str, Key, CollnetError], None] | None = None
        self._told: OrderedDict[tuple[str, Key], None] = OrderedDict()
        # Told when an ABORT arrives for a collective not started here yet (one
        # being set up may be waiting for links it no longer needs).
        self.on_early_abort: Callable[[], None] | None = None

    def _state_frame(self, meta: Any) -> StateSync | None:
        if type(meta) is list and meta and meta[0] == STATE_DATA:
            if self.state is None:
                raise ProtocolError("state sync data, but this daemon syncs no state")
            return self.state
        return None

    # -- registry ----------------------------------------------------------
    def register(self, run: CollectiveRun) -> None:
        if run.key in self.runs:
            raise ProtocolError(f"collective {run.key} is already running")
        prior = self.failed.get(run.key)
        aborted = self.early_aborts.pop(run.key, None)
        if prior is None and aborted is not None and run.world.rank_of(aborted[0]) is not None:
            prior = aborted[1]
        if prior is not None:
            dropped = self.early.pop(run.key, [])
            self.early_bytes -= sum(len(e.payload) for e in dropped)
            run.fail(prior)
            return
        self.runs[run.key] = run
        run.start()
        items = self.early.pop(run.key, [])
        self.early_bytes -= sum(len(item.payload) for item in items)
        for item in items:
            if run.done:
                break
            self._replay(run, item)

    def _replay(self, run: CollectiveRun, item: _Early) -> None:
        key, step, chunk, digest, offset, total = _parse_data_meta(item.meta)
        src = run.world.rank_of(item.peer)
        if src is None:
            # Bytes from a non-member (a stranger, or a peer of another world) have no
            # place in this collective and must not cost its members the collective.
            log.warning("collective %s: dropped early data from non-member %s", key, item.peer)
            return
        try:
            view = run.sink(src, step, chunk, digest, offset, total, len(item.payload))
            view[:] = item.payload
            run.piece_done(item.peer)
            run.received(src, step, chunk, len(item.payload))
        except CollnetError as exc:
            self.abort_everywhere(run, exc)

    def _tell_once(self, peer: str, key: Key, exc: CollnetError) -> None:
        if self.on_late is None or (peer, key) in self._told:
            return
        self._told[(peer, key)] = None
        while len(self._told) > 4096:
            self._told.popitem(last=False)
        self.on_late(peer, key, exc)

    def finish(self, run: CollectiveRun) -> None:
        self.runs.pop(run.key, None)
        exc = run.future.exception() if run.future.done() and not run.future.cancelled() else None
        if isinstance(exc, CollnetError):
            if not run.settled.is_set():
                self.settling[run.key] = run
            self.failed[run.key] = exc
            while len(self.failed) > 4096:
                self.failed.popitem(last=False)

    def abort_everywhere(self, run: CollectiveRun, exc: CollnetError) -> None:
        """Fail ``run`` here and tell every other participant why."""
        log.warning("collective %s aborted: %s: %s", run.key, exc.kind, exc)
        for rank, link in run.links.items():
            if rank != run.rank and not link.failed:
                with contextlib.suppress(CollnetError):
                    link.send_control(FrameKind.ABORT, [run.key[0], run.key[1], exc.to_wire()])
        run.fail(exc)

    # -- LinkRouter --------------------------------------------------------
    def data_sink(self, peer: str, meta: Any, nbytes: int) -> memoryview | None:
        state = self._state_frame(meta)
        if state is not None:
            return state.data_sink(peer, meta, nbytes)
        key, step, chunk, digest, offset, total = _parse_data_meta(meta)
        run = self.runs.get(key)
        if run is None:
            failed = self.failed.get(key)
            if failed is not None:
                self._tell_once(peer, key, failed)
                return None  # late piece of a finished collective: read and drop
            if self.early_bytes + nbytes > self.max_early_bytes:
                raise ProtocolError(
                    f"{peer} sent {self.early_bytes + nbytes} bytes for collectives "
                    f"not started here (limit {self.max_early_bytes})"
                )
            self.early_bytes += nbytes
            return memoryview(_EarlyBuffer(nbytes))
        src = run.world.rank_of(peer)
        if src is None:
            raise ProtocolError(f"{peer} sent data for {key} but is not in epoch {key[0]}")
        try:
            return run.sink(src, step, chunk, digest, offset, total, nbytes)
        except MismatchError as exc:
            self.abort_everywhere(run, exc)
            return None

    def on_data(self, peer: str, meta: Any, payload: memoryview) -> None:
        state = self._state_frame(meta)
        if state is not None:
            state.on_data(peer, meta, payload)
            return
        key, step, chunk, _digest, _offset, _total = _parse_data_meta(meta)
        run = self.runs.get(key)
        if isinstance(payload.obj, _EarlyBuffer):
            # Read before the collective started here; it may have started
            # while the bytes were arriving, so decide only now.
            item = _Early(peer, meta, payload.obj)
            if run is not None:
                self.early_bytes -= len(item.payload)
                self._replay(run, item)
            elif key in self.failed:
                self.early_bytes -= len(item.payload)
            else:
                self.early.setdefault(key, []).append(item)
            return
        if run is None:
            zombie = self.settling.get(key)
            if zombie is not None:  # a late piece of a failed run has landed
                zombie.piece_done(peer)
                if zombie.settled.is_set():
                    del self.settling[key]
            return
        src = run.world.rank_of(peer)
        if src is None:
            return
        run.piece_done(peer)
        try:
            run.received(src, step, chunk, len(payload))
        except CollnetError as exc:
            self.abort_everywhere(run, exc)

    def on_control(self, peer: str, frame: Frame) -> None:
        if frame.kind == FrameKind.ABORT:
            meta = frame.meta
            if not isinstance(meta, list) or len(meta) != 3 or not isinstance(meta[2], dict):
                raise ProtocolError(f"bad ABORT metadata {meta!r:.80}")
            key: Key = (meta[0], meta[1])
            remote = CollnetError.from_wire(meta[2])
            if not isinstance(remote, MismatchError | PeerLost):
                remote = CollectiveAborted(
                    f"collective {key} aborted by {peer}: {remote.message}", peer=peer
                )
            run = self.runs.get(key)
            if run is not None:
                if run.world.rank_of(peer) is None:
                    raise ProtocolError(f"{peer} sent ABORT for {key} but is not in epoch {key[0]}")
                run.fail(remote)
            elif key not in self.failed:
                self.early_aborts[key] = (peer, remote)
                while len(self.early_aborts) > 4096:
                    self.early_aborts.popitem(last=False)
                if self.on_early_abort is not None:
                    self.on_early_abort()
        elif frame.kind == FrameKind.HEARTBEAT:
            pass
        elif frame.kind == FrameKind.CONTROL and isinstance(frame.meta, dict) and self.state:
            self.state.on_control(peer, frame.meta)
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame on a data link")

    def on_link_lost(self, peer: str, exc: CollnetError) -> None:
        # A closed link writes nothing more into anyone's buffers.
        for run in [*self.runs.values(), *self.settling.values()]:
            run.piece_done(peer, all_of_them=True)
        self.settling = {k: r for k, r in self.settling.items() if not r.settled.is_set()}
        # Only this daemon (and the peer) saw this link go: the other members
        # of the affected collectives are told, or they would wait for a
        # partner that will never send until their deadline.
        self.members_gone({peer}, exc.message, tell_others=True)
        for key in [k for k, items in self.early.items() if any(i.peer == peer for i in items)]:
            self.early_bytes -= sum(len(i.payload) for i in self.early.pop(key))
        if self.state is not None:
            self.state.on_link_lost(peer, exc)
        if self.on_peer_lost is not None:
            self.on_peer_lost(peer, exc)

    def members_gone(self, peers: set[str], reason: str, tell_others: bool = False) -> None:
        """Fail every running collective that one of ``peers`` takes part in
        (and, ``tell_others``, send its other members an ABORT saying why)."""
        for run in list(self.runs.values()):
            for peer in sorted(peers):
                rank = run.world.rank_of(peer)
                if rank is not None and not run.done:
                    log.warning("collective %s: peer %s lost: %s", run.key, peer, reason)
                    exc = PeerLost(
                        f"peer {peer} (rank {rank}) lost during collective {run.key}: {reason}",
                        peer=peer,
                        rank=rank,
                        epoch=run.key[0],
                        tag=run.key[1],
                    )
                    if tell_others:
                        self.abort_everywhere(run, exc)
                    else:
                        run.fail(exc)

    def fail_all(self, exc: CollnetError) -> None:
        for run in list(self.runs.values()):
            run.fail(exc)

    def expire(self, run: CollectiveRun, timeout_s: float) -> None:
        if not run.done:
            self.abort_everywhere(
                run,
                Timeout(
                    f"collective {run.key} did not finish within {timeout_s:.1f}s",
                    epoch=run.key[0],
                    tag=run.key[1],
                ),
            )
