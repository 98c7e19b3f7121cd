"""A trainer's ``sync_state`` request: its tensors, the coordinator barriers, the timeout.

The transfer itself is ``StateSync`` (transfer.py); this module turns a
request into one: it maps the named tensors from the trainer's shared
memory, hashes them off the event loop, and gives the transfer its two
barriers at the coordinator. Those ride through a coordinator reconnect (the
barrier is called again in the same world), and fail with ``PeerLost`` if
the world moved on meanwhile or this peer was dropped from it.

A peer whose own request is bad answers its trainer at once, and still
arrives at the first barrier carrying the error, so every other member fails
with it at once instead of waiting for this peer until its deadline.
Several trainers of one node sync once, together, and each gets the state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from collnet.errors import (
    CollnetError,
    DaemonUnavailable,
    MismatchError,
    Timeout,
)
from collnet.membership.peer import PeerMembership
from collnet.membership.world import WorldView
from collnet.state import manifest_of, numpy_dtype
from collnet.transport.link import PeerLink
from collnet.wire.localapi import SyncState
from collnet.wire.localreplies import SyncStateReply
from collnet_daemon.buffers import SharedBuffers
from collnet_daemon.config import DaemonConfig
from collnet_daemon.control import ControlPlane
from collnet_daemon.executor import Executor
from collnet_daemon.localgroup import LocalGroups
from collnet_daemon.statesync.transfer import StateSync
from collnet_daemon.tasks import quiet

StateArrays = dict[str, npt.NDArray[Any]]


class SyncRequests:
    """This daemon's ``sync_state`` requests; see the module docstring."""

    def __init__(
        self,
        config: DaemonConfig,
        membership: PeerMembership,
        control: ControlPlane,
        executor: Executor,
        state: StateSync,
        buffers: SharedBuffers,
        local: LocalGroups,
        leaving: Callable[[], bool],
    ) -> None:
        self.config = config
        self.membership = membership
        self.control = control
        self.executor = executor
        self.state = state
        self.buffers = buffers
        self.local = local
        self.leaving = leaving
        # A refused sync_state's arrival at the barrier (carrying the error).
        self._refusal: asyncio.Future[None] | None = None

    async def handle(self, req: SyncState) -> SyncStateReply:
        if req.local_size == 1:
            return await self.sync(req)
        return await self._sync_local(req)

    def refuse(self, exc: CollnetError, epoch: Any) -> None:
        """A request refused before it was parsed whole still arrives at the barrier
        of its epoch's sync, with its error, if this peer is a member there."""
        try:
            world, _ = self.membership.agreed(epoch if isinstance(epoch, int) else None)
        except CollnetError:
            return
        self._arrive_refused(world, exc, self._timeout_s(None))

    async def sync(self, req: SyncState) -> SyncStateReply:
        """Bring the request's tensors to the world's reference state (a barrier)."""
        if self.leaving():
            raise DaemonUnavailable(f"daemon {self.config.peer_id} is leaving")
        world, _ = self.membership.agreed(req.epoch)
        timeout_s = self._timeout_s(req.timeout_s)
        if self._refusal is not None:
            self._refusal.cancel()  # this call takes its place at the barrier
            self._refusal = None
        try:
            arrays = self.arrays(req)
            # Hashing hundreds of MiB must not stall heartbeats on this loop.
            mine = await asyncio.to_thread(manifest_of, arrays, req.revision)
        except CollnetError as exc:
            self._arrive_refused(world, exc, timeout_s)
            raise

        async def links() -> dict[str, PeerLink]:
            by_rank = await self.executor.links_for(world, "sync_state")
            return {world.peers[r].id: link for r, link in by_rank.items()}

        try:
            return await asyncio.wait_for(
                self.state.sync(mine, arrays, links, self._barrier(world)), timeout_s
            )
        except TimeoutError:
            raise Timeout(
                f"sync_state at epoch {world.epoch} did not finish within {timeout_s:.1f}s",
                epoch=world.epoch,
                buffer_modified=True,
            ) from None

    def arrays(self, req: SyncState) -> StateArrays:
        """The request's named tensors, mapped from the trainer's segments."""
        return {
            t.name: self.buffers.array(t.shm, numpy_dtype(t.dtype), t.count, t.offset).reshape(
                t.shape
            )
            for t in req.tensors
        }

    def _timeout_s(self, timeout_s: float | None) -> float:
        return timeout_s or self.config.collective_timeout_s

    def _arrive_refused(self, world: WorldView, exc: CollnetError, timeout_s: float) -> None:
        if self._refusal is not None:
            self._refusal.cancel()
        self._refusal = asyncio.ensure_future(
            asyncio.wait_for(self.state.refuse(self._barrier(world), exc), timeout_s)
        )
        self._refusal.add_done_callback(quiet)

    def _barrier(self, world: WorldView) -> Callable[[str, Any], Any]:
        """The coordinator barriers of a sync in ``world``: this peer's arrival
        (manifest bytes, or a report) in, every member's by peer id out."""

        def still_here() -> None:
            self.membership.check_still_member(world, "sync_state")

        async def barrier(name: str, arrived: Any) -> Mapping[str, Any]:
            return await self.control.barrier(name, world.epoch, arrived, still_here)

        return barrier

    async def _sync_local(self, req: SyncState) -> SyncStateReply:
        """One state sync for this node's trainers; each gets the synced state."""
        world, _ = self.membership.agreed(req.epoch)

        async def action(reqs: list[SyncState]) -> SyncStateReply:
            states = [self.arrays(r) for r in reqs]
            declared = [{n: (a.dtype, a.shape) for n, a in st.items()} for st in states]
            if any(d != declared[0] for d in declared[1:]):
                raise MismatchError("this node's trainers declare different shared state")
            result = await self.sync(reqs[0])
            for state in states[1:]:
                for name, arr in state.items():
                    np.copyto(arr, states[0][name])
            return result

        return await self.local.run(
            ("sync_state", world.epoch), req.local_size, req, action, self._timeout_s(req.timeout_s)
        )
