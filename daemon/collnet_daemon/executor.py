"""The executor: performs the collective engine's actions on links and futures.

``collnet.engine.Router`` decides; this module does. It is the router of
every data link (``LinkRouter``): it parses each frame once into its typed
message, hands collective traffic to the engine and shared-state traffic to
``StateSync``, and performs what the engine returns (send a message, send an
ABORT, resolve the caller's future, release a failed collective's buffer).
It also owns what needs a clock or a socket around one collective: setting
up its links (given up as soon as the world moves on or a member aborts
it), its deadline, and the settling of a failed collective's buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from collnet.algo.actions import Schedule
from collnet.engine import (
    AbortedEarly,
    EngineAction,
    Failed,
    Finished,
    Router,
    Run,
    SendAbort,
    Settled,
    Transmit,
)
from collnet.errors import CollnetError, PeerLost, ProtocolError, Timeout
from collnet.membership.peer import PeerMembership, WorldChange
from collnet.membership.world import WorldView
from collnet.transport.link import PeerLink
from collnet.transport.loglimit import REMOTE
from collnet.transport.mesh import Mesh
from collnet.wire import Frame, FrameKind
from collnet.wire.datalink import AbortMessage, Key, StatePiece, parse_control, parse_data
from collnet_daemon.config import DaemonConfig
from collnet_daemon.statesync import StateSync
from collnet_daemon.tasks import TaskSet, quiet

log = logging.getLogger(__name__)

# How long a failed collective waits for pieces still landing in its buffer
# before it cuts the links still writing.
SETTLE_TIMEOUT_S = 1.0


class Executor:
    """Collectives of one daemon over its data links; see the module docstring."""

    def __init__(
        self,
        config: DaemonConfig,
        membership: PeerMembership,
        state: StateSync,
        on_new_link: Callable[[PeerLink], None] | None = None,
    ) -> None:
        self.me = config.peer_id
        self.membership = membership
        self.state = state
        self.engine = Router(self.me, config.max_early_bytes, config.max_early_bytes_per_peer)
        self.mesh = Mesh(
            self.me,
            config.connections,
            self,
            connect_timeout_s=config.connect_timeout_s,
            liveness=config.liveness,
            secret=config.secret,
            on_new_link=on_new_link,
            tls=config.tls,
            members=lambda: {*membership.world.ids, *membership.world.pending},
        )
        self._futures: dict[Key, asyncio.Future[None]] = {}
        self._links: dict[Key, dict[int, PeerLink]] = {}
        self._settled: dict[Key, asyncio.Future[None]] = {}
        # Set (and replaced) whenever the world moves on or an early ABORT
        # arrives: what collectives waiting for their links watch.
        self._changed = asyncio.Event()
        self._tasks = TaskSet(self._link_up_failed)
        # Collectives started so far: how the link prober tells a quiet daemon
        # from one whose collectives merely fell between its looks.
        self.started = 0

    @property
    def running(self) -> int:
        return len(self.engine.runs)

    # -- one collective ----------------------------------------------------
    async def run(
        self,
        key: Key,
        world: WorldView,
        rank: int,
        schedule: Schedule,
        digest: int,
        timeout_s: float,
        what: str,
    ) -> None:
        """Run ``schedule`` as collective ``key`` of ``world``; the caller's buffer
        holds the result on return. A failure raises with ``buffer_modified``."""
        self.started += 1
        links = await self.links_for(world, f"{what} {key}", key)
        future = asyncio.get_running_loop().create_future()
        self._futures[key] = future
        self._links[key] = links
        # Its links share a node's link (this one's or a peer's): what each
        # carries now is not its path's rate.
        shared = list(links.values()) if schedule.shares_node_link else []
        for link in shared:
            link.rx_meter.share()
        try:
            self.perform(self.engine.start(Run(key, world, rank, schedule, digest)))
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout_s)
            except TimeoutError:
                self.perform(self.engine.expire(key, timeout_s))
                await self._settle(key)
                raise Timeout(
                    f"{what} {key} timed out after {timeout_s:.1f}s",
                    epoch=key[0],
                    tag=key[1],
                    buffer_modified=True,
                ) from None
            except CollnetError as exc:
                # The schedule reduces in place: the tensor may hold partial results.
                await self._settle(key)
                raise exc.with_buffer_modified(True) from None
        finally:
            if self._futures.get(key) is future:
                del self._futures[key]
            self._links.pop(key, None)
            for link in shared:
                link.rx_meter.unshare()
        # Sent payloads may be views of the caller's tensor: they must reach the
        # kernel before the caller may touch the tensor again.
        await asyncio.gather(*(link.drain() for link in links.values()), return_exceptions=True)

    def refuse(self, key: Key, world: WorldView, exc: CollnetError) -> None:
        """This peer will not run ``key``: its other members hear why now."""
        self.perform(self.engine.refuse(key, world, exc))

    def cancel(self, key: Key, exc: CollnetError) -> bool:
        cancelled, actions = self.engine.cancel(key, exc, self.membership.world_at(key[0]))
        self.perform(actions)
        return cancelled

    def fail_all(self, exc: CollnetError) -> None:
        self.perform(self.engine.fail_all(exc))

    async def wait_running(self, timeout_s: float) -> None:
        """Until every collective running now has ended (at most ``timeout_s``)."""
        if self._futures:
            await asyncio.wait(list(self._futures.values()), timeout=timeout_s)

    async def _settle(self, key: Key) -> None:
        """Before a failed collective's buffer goes back to its owner, make sure no
        piece still being received can land in it: wait briefly, then cut the
        links still writing."""
        if not self.engine.settling(key):
            return
        waiter = self._settled.setdefault(key, asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), SETTLE_TIMEOUT_S)
        except TimeoutError:
            for peer in self.engine.still_writing(key):
                log.warning(
                    "collective %s: dropping link to %s, still writing into a "
                    "failed collective's buffer",
                    key,
                    peer,
                )
                self.mesh.drop(peer, "still writing into a failed collective")
        finally:
            self._settled.pop(key, None)

    # -- links -------------------------------------------------------------
    async def links_for(
        self, world: WorldView, what: str, key: Key | None = None
    ) -> dict[int, PeerLink]:
        """Links to every other member of ``world``, keyed by rank; given up as soon
        as the world moves on or another member aborts ``key``: a link to a peer
        that just died would otherwise be awaited for the whole connect timeout."""
        if world.size == 1:
            return {}
        task = asyncio.ensure_future(self.connect_all(world))
        try:
            while True:
                news = asyncio.ensure_future(self._changed.wait())
                done, _ = await asyncio.wait({task, news}, return_when=asyncio.FIRST_COMPLETED)
                news.cancel()
                if task in done:
                    break
                self.membership.check_current(world, what)
                aborted = self.engine.aborted_early(key, world) if key is not None else None
                if aborted is not None:
                    raise aborted
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(quiet)
        links = task.result()
        self.membership.check_current(world, what)
        return links

    async def connect_all(self, world: WorldView) -> dict[int, PeerLink]:
        """Links to every other member of ``world``, keyed by rank."""
        others = [(r, p) for r, p in enumerate(world.peers) if p.id != self.me]
        links = await asyncio.gather(
            *(self.mesh.get_link(p.id, (p.host, p.port)) for _, p in others),
            return_exceptions=True,
        )
        out: dict[int, PeerLink] = {}
        for (rank, _), link in zip(others, links, strict=True):
            if isinstance(link, BaseException):
                if isinstance(link, CollnetError):
                    raise link
                raise PeerLost(f"cannot link to rank {rank}: {link}") from link
            out[rank] = link
        return out

    def world_changed(self, change: WorldChange) -> None:
        """A new world was adopted: fail what the departed took part in, drop their
        links, and link up with the new members."""
        self.engine.world_is(change.world)
        if change.moved:
            self._news()
        self.mesh.world_changed()  # a member's link may be waiting for this world
        if change.gone:
            # A frozen peer gives no socket error: the coordinator's verdict is what
            # ends the collectives waiting on it.
            reason = f"removed from the world at epoch {change.world.epoch}"
            self.perform(self.engine.members_gone(change.gone, reason))
        for peer in change.gone:
            self.mesh.drop(peer, "left the world")
        if change.member(self.me):
            self._tasks.spawn(self.connect_all(change.world))

    def _news(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _link_up_failed(self, exc: BaseException) -> None:
        log.debug("daemon %s: linking up failed: %s", self.me, exc)

    async def close(self) -> None:
        self._tasks.cancel()
        await self.mesh.close()

    # -- performing the engine's actions -----------------------------------
    def perform(self, actions: list[EngineAction]) -> None:
        broken: Key | None = None
        for action in actions:
            if type(action) is Transmit:
                if action.key == broken:
                    continue
                try:
                    self._links[action.key][action.to].send_data(
                        action.head, action.payload, action.fan, action.timed
                    )
                except CollnetError as exc:
                    broken = action.key
                    self.perform(self.engine.send_failed(action.key, exc))
            elif isinstance(action, SendAbort):
                link = self.mesh.link_if_ready(action.peer)
                if link is not None:
                    with contextlib.suppress(CollnetError):
                        link.send_control(FrameKind.ABORT, action.message.to_wire())
            elif isinstance(action, Finished):
                future = self._futures.get(action.key)
                if future is not None and not future.done():
                    future.set_result(None)
            elif isinstance(action, Failed):
                future = self._futures.get(action.key)
                if future is not None and not future.done():
                    future.set_exception(action.error)
            elif isinstance(action, Settled):
                waiter = self._settled.get(action.key)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(action, AbortedEarly):
                self._news()

    # -- LinkRouter: every data link's frames ------------------------------
    def data_sink(self, peer: str, meta: Any, nbytes: int) -> memoryview | None:
        piece = parse_data(meta)
        if isinstance(piece, StatePiece):
            return self.state.data_sink(peer, piece, nbytes)
        view, actions = self.engine.data_sink(peer, piece, nbytes)
        if actions:
            self.perform(actions)
        return view

    def on_data(self, peer: str, meta: Any, payload: memoryview) -> None:
        piece = parse_data(meta)
        if isinstance(piece, StatePiece):
            self.state.on_data(peer, piece, payload)
            return
        if not payload.nbytes:
            # The reader asks no sink where an empty payload goes, but the engine
            # must place every message, and a barrier's are nothing but their names.
            payload, placed = self.engine.data_sink(peer, piece, 0)
            if placed:
                self.perform(placed)
        actions = self.engine.on_data(peer, piece, payload)
        if actions:
            self.perform(actions)

    def on_control(self, peer: str, frame: Frame) -> None:
        if frame.kind == FrameKind.ABORT:
            self.perform(self.engine.on_abort(peer, AbortMessage.from_wire(frame.meta)))
        elif frame.kind == FrameKind.HEARTBEAT:
            pass
        elif frame.kind == FrameKind.CONTROL:
            # A non-member's fetch is refused before any work, and its link closed:
            # serving (or refusing range by range) amplifies for anyone with a link.
            member = peer in self.membership.world.ids
            link = self.mesh.link_if_ready(peer) if member else self.mesh.links.get(peer)
            self.state.on_control(peer, parse_control(frame.meta), link, member)
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame on a data link")

    def on_link_lost(self, peer: str, exc: CollnetError) -> None:
        self.perform(self.engine.link_lost(peer, exc.message))
        self.state.on_link_lost(peer, exc)
        # A failed link is of no use to anyone: the table holds only live ones, so
        # ids a stranger claims leave nothing behind (a member is dialled again).
        link = self.mesh.links.get(peer)
        if link is not None and link.failed:
            self.mesh.drop(peer)
        # Links close routinely (a peer left, shutdown); failed collectives are
        # logged by the engine, so this is only informational.
        REMOTE.info(log, peer, "daemon %s: link to %s closed: %s", self.me, peer, exc.message)
