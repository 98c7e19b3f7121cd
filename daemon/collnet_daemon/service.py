"""The peer daemon: lifecycle and wiring of its parts, nothing more.

One ``Daemon`` per node. Each part owns one thing, and this module builds
them, wires them by their constructors, starts and stops them:

- ``PeerMembership`` (collnet.membership.peer): the world this peer holds;
- ``ControlPlane`` (control.py): the coordinator, reconnected forever;
- ``Executor`` (executor.py): the data links and the collective engine;
- ``StateSync`` and ``SyncRequests`` (statesync/): shared-state sync;
- ``AllReduces`` (allreduce.py): all-reduce requests, alone or per node;
- ``Collectives`` (collectives.py): broadcast, all-gather, reduce-scatter, barrier;
- ``LocalApi`` (handlers.py) behind ``IpcServer`` (ipc.py): the trainers;
- ``Session`` (session.py): leaves the world when the node's trainers are
  gone (the daemon stays up) and registers again when one joins;
- ``LinkReporter`` (linkreport.py): link probes, and estimates to the coordinator;
- ``DaemonMetrics`` (metrics.py), reading a ``DaemonSnapshot``.

A world adopted from any source (registration, barrier answer, push) goes
through ``_adopt``: the membership machine decides whether it is news, and
the executor fails what departed members took part in.
"""

from __future__ import annotations

import asyncio
import logging

from collnet.addresses import loopback_tcp
from collnet.errors import DaemonUnavailable, ProtocolError
from collnet.membership import PeerInfo, WorldView
from collnet.membership.peer import PeerMembership
from collnet_daemon.allreduce import AllReduces
from collnet_daemon.buffers import SharedBuffers
from collnet_daemon.collectives import Collectives
from collnet_daemon.config import DaemonConfig
from collnet_daemon.control import ControlPlane
from collnet_daemon.executor import Executor
from collnet_daemon.handlers import LocalApi
from collnet_daemon.ipc import IpcServer
from collnet_daemon.linkreport import LinkReporter
from collnet_daemon.localaccess import LocalAccess
from collnet_daemon.localgroup import LocalGroups
from collnet_daemon.metrics import DaemonMetrics, DaemonSnapshot
from collnet_daemon.session import Session
from collnet_daemon.statesync import StateSync
from collnet_daemon.statesync.requests import SyncRequests
from collnet_daemon.tasks import TaskSet

log = logging.getLogger(__name__)


class Daemon:
    """One node's daemon; see the module docstring."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.id = config.peer_id
        self.membership = PeerMembership(self.id)
        self.metrics = DaemonMetrics(self.snapshot)  # served only if the CLI asks
        self.state = StateSync(self.id, config.state_chunk_bytes)
        self.executor = Executor(
            config, self.membership, self.state, on_new_link=self.metrics.traffic.track
        )
        self.control = ControlPlane(
            config, lambda: self.membership.world, self._adopt, self._world_refused
        )
        self.buffers = SharedBuffers()
        self.local = LocalGroups()
        entry = (
            config,
            self.membership,
            self.executor,
            self.buffers,
            self.local,
            self.metrics,
            self._leaving,
        )
        self.all_reduces = AllReduces(*entry)
        self.collectives = Collectives(*entry)
        self.syncs = SyncRequests(
            config,
            self.membership,
            self.control,
            self.executor,
            self.state,
            self.buffers,
            self.local,
            self._leaving,
        )
        self.session = Session(
            self.id,
            self.membership,
            self.control,
            self.executor,
            self.local,
            self._adopt,
            self._session_ended,
        )
        self.api = LocalApi(
            config,
            self.membership,
            self.control,
            self.executor,
            self.all_reduces,
            self.collectives,
            self.syncs,
            self.buffers,
            self.local,
            self.session,
            adopt=self._adopt,
            leave=self._leave_soon,
        )
        fallback = loopback_tcp(config.ipc_tcp_port) if config.ipc_tcp_port else None
        self.ipc = IpcServer(
            config.ipc,
            self.metrics.observed(self.api.handle),
            fallback,
            on_disconnect=self._client_gone,
            access=LocalAccess(config.ipc_group, config.ipc_token_file),
        )
        self.data_addr: tuple[str, int] = ("", 0)
        self.stopped = asyncio.Event()
        # Why it stopped: True when it announced its leave (a signal or a client's
        # leave request), False when stopped without leaving.
        self.left = False
        self._stopping: asyncio.Future[None] | None = None
        self._tasks = TaskSet(self._background_failed)
        self.link_report = LinkReporter(
            self.id,
            config.link_report_s,
            self.executor.mesh,
            self.control,
            lambda: self.executor.running > 0,
            activity=lambda: self.executor.started,
        )

    def snapshot(self) -> DaemonSnapshot:
        return DaemonSnapshot(
            peer_id=self.id,
            world=self.membership.world,
            collectives_in_flight=self.executor.running,
            coordinator_connected=self.control.connected,
            coordinator_rtt_s=self.control.rtt_s,
            links=dict(self.executor.mesh.links),
        )

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        host, port = await self.executor.mesh.listen(*self.config.listen)
        self.data_addr = self.config.advertised((host, port))
        await self.control.start(PeerInfo(self.id, *self.data_addr))
        self.ipc.start()
        if self.config.link_report_s > 0:
            self.link_report.start()
        log.info(
            "daemon %s: data %s:%d, ipc %s, pending admission",
            self.id,
            *self.data_addr,
            self.config.ipc,
        )

    async def stop(self, leave: bool = True) -> None:
        """Stop once; a second caller waits until the first caller's stop has finished."""
        if self._stopping is None:
            self.left = leave
            self.stopped.set()
            self.control.stop_reconnecting()
            self._stopping = asyncio.ensure_future(self._stop(leave))
        await asyncio.shield(self._stopping)

    def _leaving(self) -> bool:
        return self._stopping is not None

    async def _stop(self, leave: bool) -> None:
        if leave and self.executor.running:
            # A graceful leave lets the collectives this peer is part of finish
            # (new ones are refused from now on), so none fails because of it.
            log.info(
                "daemon %s: draining %d collectives before leaving", self.id, self.executor.running
            )
            await self.executor.wait_running(self.config.drain_timeout_s)
        if leave:
            await self.control.leave(timeout_s=2.0)
        shutting_down = DaemonUnavailable(f"daemon {self.id} is shutting down")
        self.executor.fail_all(shutting_down)
        self.local.fail_all(shutting_down)
        self.session.close()
        self.state.close()
        self._tasks.cancel()
        self.link_report.close()
        self.control.close()
        await self.ipc.close()
        await self.executor.close()
        self.buffers.close()

    def _leave_soon(self) -> None:
        self._tasks.spawn(self.stop())

    def _background_failed(self, exc: BaseException) -> None:
        log.warning("daemon %s: background task failed: %s", self.id, exc)

    # -- membership --------------------------------------------------------
    def _adopt(self, world: WorldView) -> None:
        change = self.membership.apply(world)
        if change is not None:
            self.executor.world_changed(change)

    def _world_refused(self, exc: ProtocolError) -> None:
        # Not a crash loop: the coordinator will not take this world back, so this
        # daemon stops once, saying why; started again, it joins as a new peer.
        log.error(
            "daemon %s: the coordinator refused the world this daemon holds (epoch %d): "
            "%s; stopping (start it again to join as a new peer)",
            self.id,
            self.membership.world.epoch,
            exc.message,
        )
        self._tasks.spawn(self.stop(leave=False))

    def _client_gone(self, ident: bytes) -> None:
        if self._stopping is None:  # a stop closes every client's connection
            self.session.trainer_gone(ident)

    def _session_ended(self) -> None:
        if self.config.leave_when_trainers_exit and self._stopping is None:
            log.warning("daemon %s: its trainers are gone; stopping as configured", self.id)
            self._leave_soon()
