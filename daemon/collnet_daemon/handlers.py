"""The local API of the daemon: a table of handlers, one per request kind.

Every request from a trainer is parsed once, here, into its typed form
(``collnet.wire.localapi``); a handler gets only that. A request refused
while parsing that named a collective is refused on the other peers too
(they would otherwise wait for this one until their deadline). The calls
that make a client one of this node's trainers (``update_topology``, any
call in a local group) are told to the node's ``Session``, which leaves the
world when they are gone; a trainer's ``update_topology`` first has the
daemon registered again if the session had ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from collnet.errors import InvalidArgument
from collnet.membership.peer import PeerMembership
from collnet.membership.world import WorldView
from collnet.wire.collectives import COLLECTIVE_TYPES, CollectiveRequest
from collnet.wire.localapi import (
    AllReduce,
    BenchAllReduce,
    Cancel,
    GetWorld,
    Hello,
    Leave,
    Release,
    Request,
    SyncState,
    UpdateTopology,
    parse_request,
)
from collnet.wire.localreplies import HelloReply, WorldReply
from collnet_daemon import clientops
from collnet_daemon.allreduce import AllReduces
from collnet_daemon.buffers import SharedBuffers
from collnet_daemon.collectives import Collectives
from collnet_daemon.config import DaemonConfig
from collnet_daemon.control import ControlPlane
from collnet_daemon.executor import Executor
from collnet_daemon.localgroup import LocalGroups
from collnet_daemon.session import Session
from collnet_daemon.statesync.requests import SyncRequests

log = logging.getLogger(__name__)

Reply = dict[str, Any]

# Requests that name a collective run with the all-reduce's refusal path.
_COLLECTIVE_KINDS = frozenset({AllReduce.KIND, *(cls.KIND for cls in COLLECTIVE_TYPES)})


class LocalApi:
    """Answers the requests of this node's trainers; see the module docstring."""

    def __init__(
        self,
        config: DaemonConfig,
        membership: PeerMembership,
        control: ControlPlane,
        executor: Executor,
        all_reduces: AllReduces,
        collectives: Collectives,
        syncs: SyncRequests,
        buffers: SharedBuffers,
        local: LocalGroups,
        session: Session,
        adopt: Callable[[WorldView], None],
        leave: Callable[[], None],
    ) -> None:
        self.config = config
        self.membership = membership
        self.control = control
        self.executor = executor
        self.all_reduces = all_reduces
        self.collectives = collectives
        self.syncs = syncs
        self.buffers = buffers
        self.local = local
        self.session = session
        self.adopt = adopt
        self.leave = leave
        self._table: dict[type[Any], Callable[[bytes, Any], Awaitable[Reply]]] = {
            Hello: self._hello,
            GetWorld: self._world,
            UpdateTopology: self._update_topology,
            AllReduce: self._all_reduce,
            SyncState: self._sync_state,
            Cancel: self._cancel,
            BenchAllReduce: self._bench,
            Release: self._release,
            Leave: self._leave,
            **{cls: self._collective for cls in COLLECTIVE_TYPES},
        }

    async def handle(self, ident: bytes, raw: dict[str, Any]) -> Reply:
        try:
            req: Request = parse_request(raw)
        except InvalidArgument as exc:
            if raw.get("op") in _COLLECTIVE_KINDS:
                self.all_reduces.refuse(exc)
            elif raw.get("op") == SyncState.KIND:
                self.syncs.refuse(exc, raw.get("epoch"))
            raise
        return await self._table[type(req)](ident, req)

    # -- handlers ----------------------------------------------------------
    async def _hello(self, ident: bytes, req: Hello) -> Reply:
        world = self.membership.world
        return HelloReply(self.config.peer_id, world, self.config.codec_block_size).to_wire()

    async def _world(self, ident: bytes, req: GetWorld) -> Reply:
        world = await self.control.world(timeout_s=10.0)
        self.adopt(world)
        return WorldReply(world).to_wire()

    async def _update_topology(self, ident: bytes, req: UpdateTopology) -> Reply:
        self.session.joined(ident, req.local_size)
        if req.local_size == 1:
            world = await self.update_topology()
        else:
            # This node's trainers agree first: the coordinator counts the node once.
            world = await self.local.run(
                (UpdateTopology.KIND,),
                req.local_size,
                req,
                lambda _: self.update_topology(),
                req.timeout_s or self.config.collective_timeout_s,
            )
        return WorldReply(world).to_wire()

    async def update_topology(self) -> WorldView:
        """The membership barrier; this peer then holds the world it agreed on."""
        await self.session.open(self.config.collective_timeout_s)
        world = await self.control.update_topology(self.config.collective_timeout_s)
        # The world the barrier agreed on, not a newer one a push brought meanwhile:
        # the other members run this round in that world.
        self.adopt(world)
        if self.config.peer_id in world.ids and world.epoch == self.membership.world.epoch:
            # (An older world's first collective fails at once: no links needed.)
            await self.executor.connect_all(world)
        return world

    async def _all_reduce(self, ident: bytes, req: AllReduce) -> Reply:
        if req.local_size > 1:  # the node's group cannot complete without this one
            self.session.joined(ident, req.local_size)
        await self.all_reduces.handle(req)
        return {}

    async def _collective(self, ident: bytes, req: CollectiveRequest) -> Reply:
        if req.local_size > 1:  # as for an all-reduce
            self.session.joined(ident, req.local_size)
        return await self.collectives.handle(req)

    async def _sync_state(self, ident: bytes, req: SyncState) -> Reply:
        if req.local_size > 1:
            self.session.joined(ident, req.local_size)
        return (await self.syncs.handle(req)).to_wire()

    async def _cancel(self, ident: bytes, req: Cancel) -> Reply:
        return clientops.cancel(self.executor, req)

    async def _bench(self, ident: bytes, req: BenchAllReduce) -> Reply:
        epoch = self.membership.world.epoch
        return await clientops.bench_all_reduce(self.all_reduces, self.buffers, epoch, req)

    async def _release(self, ident: bytes, req: Release) -> Reply:
        self.buffers.release(req.shm)
        return {}

    async def _leave(self, ident: bytes, req: Leave) -> Reply:
        # After this reply has gone out: the stop closes the IPC socket.
        asyncio.get_running_loop().call_soon(self.leave)
        return {}
