"""This node's session: the daemon leaves the world when its trainers are gone,
and registers again when one joins.

``collnet.membership.session.Roster`` decides who the trainers are and when
the session ends; this module does what follows:

- the session ends (a trainer's connection closed: exit, kill -9): the
  node's trainers still waiting in a local group fail at once with
  ``PeerLost`` naming this daemon. ``LINGER_S`` later the daemon leaves the
  world (``ControlPlane.end_session``) and adopts the world without itself,
  so its own collectives still running fail too; the other members' fail
  with ``PeerLost`` naming it when the coordinator's push reaches them, well
  within the failure bound and never at their deadline. The daemon stays up,
  serving its local API (``--leave-when-trainers-exit``: and then it stops);
- a trainer joins while the session is over (its ``update_topology``): the
  daemon registers again, as pending, before that barrier call; it is
  admitted when every active member calls ``update_topology`` and the epoch
  moves, so survivors and newcomer alike count default tags from 1 again,
  and ``sync_state`` brings the newcomer up to date.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from collnet.errors import CollnetError, DaemonUnavailable, PeerLost
from collnet.membership.peer import PeerMembership
from collnet.membership.session import Roster
from collnet.membership.world import WorldView
from collnet.wire.localapi import UpdateTopology
from collnet_daemon.control import ControlPlane
from collnet_daemon.executor import Executor
from collnet_daemon.localgroup import LocalGroups
from collnet_daemon.tasks import TaskSet

log = logging.getLogger(__name__)

# A leave is one round trip to the coordinator: past this, the daemon cuts the
# connection instead (the coordinator then drops it as a lost peer).
LEAVE_TIMEOUT_S = 2.0
# A trainer that exits right after its last collective is the common case: its
# bytes may still be on their way to peers whose copy of that collective has not
# completed, and the push of a new world would fail it there. The linger lets
# them land; a collective this daemon still runs may complete meanwhile too.
LINGER_S = 0.5


class Session:
    """Ends and opens this node's session; see the module docstring."""

    def __init__(
        self,
        me: str,
        membership: PeerMembership,
        control: ControlPlane,
        executor: Executor,
        local: LocalGroups,
        adopt: Callable[[WorldView], None],
        on_ended: Callable[[], None],
    ) -> None:
        self.me = me
        self.membership = membership
        self.control = control
        self.executor = executor
        self.local = local
        self.adopt = adopt
        self.on_ended = on_ended
        self.roster = Roster()
        self._ending: asyncio.Future[None] | None = None
        self._tasks = TaskSet(self._end_failed)

    def joined(self, trainer: bytes, local_size: int = 1) -> None:
        self.roster.joined(trainer, local_size)

    def trainer_gone(self, trainer: bytes) -> None:
        """A client's connection closed; ends the session if it was what kept it."""
        if self.roster.gone(trainer):
            self._ending = self._tasks.spawn(self._end())

    async def open(self, timeout_s: float) -> None:
        """Before a trainer's ``update_topology``: registered, pending if new."""
        if self._ending is not None:
            await asyncio.wait([self._ending])  # its failure is logged, not the joiner's
        loop = asyncio.get_running_loop()
        deadline, delay_s = loop.time() + timeout_s, 0.2
        while not self.roster.open:
            try:
                await self.control.begin_session()
            except (CollnetError, OSError, TimeoutError) as exc:
                if loop.time() + delay_s > deadline:
                    raise DaemonUnavailable(
                        f"daemon {self.me} could not register again within {timeout_s:.0f}s: {exc}"
                    ) from None
                log.info("daemon %s: registering again failed (%s); retrying", self.me, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)
                continue
            self.roster.opened()
            log.info("daemon %s: a trainer joined: registered again, pending", self.me)

    def close(self) -> None:
        self._tasks.cancel()

    async def _end(self) -> None:
        lost = PeerLost(
            f"a trainer of node {self.me} is gone, so daemon {self.me} left the world: "
            "call update_topology, then retry",
            peer=self.me,
            epoch=self.membership.world.epoch,
        )
        log.warning(
            "daemon %s: this node's trainers are gone; leaving the world (the daemon stays up)",
            self.me,
        )
        self.local.fail_all(lost)
        await asyncio.sleep(LINGER_S)
        await self.control.end_session(LEAVE_TIMEOUT_S)
        try:
            world = await self.control.world(LEAVE_TIMEOUT_S)
        except (CollnetError, TimeoutError) as exc:
            log.info("daemon %s: no world after leaving: %s", self.me, exc)
        else:
            # Without this daemon in it: its own collectives fail, naming it.
            self.adopt(world)
        self.executor.fail_all(lost)
        # Groups a surviving local trainer opened meanwhile, but its update_topology:
        # that one waits for the trainer started again, and then registers this daemon.
        self.local.fail_all(lost, spare=(UpdateTopology.KIND,))
        self.on_ended()

    def _end_failed(self, exc: BaseException) -> None:
        log.warning("daemon %s: ending the session failed: %s", self.me, exc)
