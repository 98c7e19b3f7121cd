"""The trainers of a chaos run: one thread per daemon, each with its own ``Comm``.

A trainer loops over rounds (barrier, state sync, checked all-reduce, outer
step; see ``collnet_lab.chaos``) until the run ends, and tells the
``Recorder`` what happened. ``Node`` ties a daemon process to its trainer.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import xxhash
from collnet_client.client import Comm

from collnet.errors import (
    CollectiveAborted,
    CollnetError,
    DaemonUnavailable,
    PeerLost,
    Timeout,
)
from collnet.state import manifest_of
from collnet_lab.chaos.config import BLAME_WINDOW_S
from collnet_lab.chaos.rounds import check_result, peer_input, round_plan
from collnet_lab.localcluster import DaemonProc

if TYPE_CHECKING:
    from collnet_lab.chaos.driver import ChaosRun

T = TypeVar("T")

# The failures a disturbance may legitimately cause on a survivor.
EXPECTED_ERRORS = (PeerLost, Timeout, DaemonUnavailable, CollectiveAborted)


class _OwnDaemonGone(Exception):
    """The trainer's own daemon was killed (or exited): the trainer ends with it.

    Raised by ``Trainer._failed`` for any failure once ``Node.gone()``. That
    includes the ``DaemonUnavailable`` with which the SDK cuts short a call
    once ``Node.gone()`` (its ``daemon_gone``): the daemon was doomed (killed,
    frozen then killed, or the run is stopping) or has exited. ``gone()``
    never turns false again, so ``_failed`` sees what the SDK saw.
    """


@dataclass
class Node:
    """One daemon process of the run and its trainer."""

    daemon: DaemonProc
    peer_id: str
    initial: bool
    state: str = "live"  # live | frozen | killed | exited
    ever_frozen: bool = False
    resumed_at: float | None = None
    restarted: bool = False
    doomed: threading.Event = field(default_factory=threading.Event)
    trainer: threading.Thread | None = None
    loop: Trainer | None = None

    def gone(self) -> bool:
        return self.doomed.is_set() or self.daemon.proc.poll() is not None


class Trainer:
    """The loop of one trainer thread; see the docstring of ``collnet_lab.chaos``."""

    def __init__(self, run: ChaosRun, node: Node) -> None:
        self.run = run
        self.node = node
        self.peer = node.peer_id
        self.comm: Comm | None = None
        # What it is doing, for the split-barrier monitor: "barrier" (in
        # update_topology), "reduce" (in the all-reduce of ``key``) or "other";
        # since when; and the last round it took part in.
        self.phase = "other"
        self.since = time.monotonic()
        self.key: tuple[int, int] | None = None
        self.last_key: tuple[int, int] = (-1, -1)

    def main(self) -> None:
        try:
            self._main()
        except _OwnDaemonGone:
            self._ended("its daemon went away")
        except BaseException as exc:
            tb = "".join(traceback.format_exception(exc))
            self.run.rec.bug(f"trainer {self.peer}: {exc!r}\n{tb}")
        finally:
            if self.comm is not None:
                self.comm.close()

    def _ended(self, why: str) -> None:
        n = self.node
        if n.doomed.is_set() or n.ever_frozen:
            self.run.rec.victim(self.peer, why)
        elif self.run.ending.is_set() and n.daemon.proc.poll() is not None:
            pass  # the cluster is being stopped under it
        else:
            # Nobody touched this daemon, yet it is gone.
            n.daemon.proc.poll()
            self.run.rec.anomaly(
                f"{self.peer}: daemon exited undisturbed (exit {n.daemon.proc.returncode}): {why}"
            )

    def _main(self) -> None:
        run, cfg, rec = self.run, self.run.cfg, self.run.rec
        timeout = cfg.call_timeout_s
        try:
            # A trainer would die with its node; here it is a thread, so the SDK
            # asks ``gone`` while it waits and gives up once its daemon was killed
            # or has exited, instead of waiting out the call timeout.
            self.comm = comm = Comm(self.node.daemon.ipc, timeout, daemon_gone=self.node.gone)
        except CollnetError as exc:
            if self.node.gone():
                raise _OwnDaemonGone from exc
            raise
        n = cfg.nbytes // 4
        buf = comm.empty(n, np.float32)
        m = max(1, cfg.state_bytes // 4)
        # Fresh (a joiner's, or a restarted peer's) state: zeros at revision 0.
        state = {"w": comm.zeros(m, np.float32), "steps": comm.zeros(1, np.int64)}
        revision = 0
        epoch, k = -1, 0
        member = False
        backoff = 0.0
        while True:
            if self.node.gone():
                raise _OwnDaemonGone
            # 1. The barrier of the round: admits joiners, agrees on the world.
            try:
                self._enter("barrier", None)
                world = self._timed(
                    "update_topology", None, lambda: comm.update_topology(timeout_s=timeout)
                )
            except CollnetError as exc:
                self._failed(None, "update_topology", exc)
                # A daemon reconnecting to the coordinator fails these at once.
                backoff = min(1.0, max(0.02, 2 * backoff))
                time.sleep(backoff)
                continue
            backoff = 0.0
            self._enter("other", None)
            if self.peer not in world.peers:
                rec.anomaly(f"{self.peer}: update_topology returned a world without it: {world}")
                time.sleep(0.1)
                continue
            if not member:
                member = True
                if not self.node.initial:
                    rec.admitted(self.peer)
            if world.epoch != epoch:
                epoch, k = world.epoch, 0
            key = (epoch, k)
            k += 1
            rec.world_of(key, world.peers, self.peer)
            # 2. Shared-state sync: everyone leaves with the newest state, bit-identical.
            try:
                self._enter("sync", key)
                synced = self._timed(
                    "sync_state",
                    key,
                    functools.partial(comm.sync_state, state, revision, timeout_s=timeout),
                )
            except CollnetError as exc:
                self._failed(key, "sync_state", exc)
                continue
            finally:
                self._enter("other", None)
            revision = synced.revision
            held = manifest_of(state, revision).state_digest()
            problem = None
            if not synced.in_parity:
                problem = "sync_state reported members out of parity"
            elif held != synced.state_digest:
                problem = f"holds {held[:12]}, the sync reported {synced.state_digest[:12]}"
            rec.synced(key, self.peer, held, synced.bytes_fetched, problem)
            # 3. The all-reduce of the round.
            codec, algo = round_plan(key[1], cfg.quantized)
            np.copyto(buf, peer_input(run.seed, self.peer, *key, n, codec))
            if codec == "none":
                buf[0] = 1.0 if run.ending.is_set() else 0.0
            try:
                reduce = functools.partial(
                    comm.all_reduce, buf, codec=codec, algo=algo, tag=f"r{key[1]}"
                )
                self._enter("reduce", key)
                self.last_key = key
                if cfg.trace:
                    rec.event("%s round %s start %s %s %s", self.peer, key, codec, algo, world)
                self._timed("all_reduce", key, functools.partial(reduce, timeout_s=timeout))
            except CollnetError as exc:
                self._failed(key, "all_reduce", exc)
                continue
            finally:
                self._enter("other", None)
            # 4. The checks.
            ref = run.refs.get(*key, world.peers, codec)
            problem = check_result(buf, ref, world.size, codec)
            digest = xxhash.xxh3_64_intdigest(buf.data)
            if cfg.trace:
                rec.event("%s round %s done %016x", self.peer, key, digest)
            if problem is not None:
                # The evidence, next to the logs: the result this trainer got.
                np.save(run.logdir / f"divergent-{key[0]}-{key[1]}-{self.peer}.npy", buf)
            rec.completed(key, self.peer, digest, problem)
            # The outer step: a deterministic function of the state and the
            # bit-identical result, so the members that completed the round hold
            # equal states at the next revision (and the others fetch it).
            w = state["w"]
            w *= np.float32(0.5)
            w[: min(m, n)] += buf[: min(m, n)]
            state["steps"] += 1
            revision += 1
            if codec == "none" and buf[0] > 0:
                # Everyone who completed this round saw the same vote: stop together.
                try:
                    comm.leave()
                except CollnetError as exc:
                    self._failed(key, "leave", exc)
                rec.event("%s leaves after round %s", self.peer, key)
                return

    def victim_view(self) -> bool:
        """Its own daemon is (or was just) frozen: its calls see the victim's side."""
        n = self.node
        return n.state == "frozen" or (
            n.resumed_at is not None and time.monotonic() - n.resumed_at < BLAME_WINDOW_S
        )

    def _enter(self, phase: str, key: tuple[int, int] | None) -> None:
        self.phase, self.key, self.since = phase, key, time.monotonic()

    def _timed(self, op: str, key: tuple[int, int] | None, call: Callable[[], T]) -> T:
        t0 = time.monotonic()
        try:
            return call()
        finally:
            took = time.monotonic() - t0
            rec = self.run.rec
            # A frozen or killed daemon's own trainer waits for its daemon: no stall.
            if not self.victim_view() and not self.node.gone():
                rec.call_took(op, took)
                if took > self.run.cfg.stall_s:
                    rec.stall(f"{self.peer} {op} {key} took {took:.1f}s")

    def _failed(self, key: tuple[int, int] | None, op: str, exc: CollnetError) -> None:
        n = self.node
        if n.gone():
            raise _OwnDaemonGone from exc
        if self.victim_view():
            # Its own daemon was (just) frozen: what it reports is the victim's view.
            if isinstance(exc, DaemonUnavailable):
                self._await_exit(exc)
            self.run.rec.victim(self.peer, f"{op}: {exc.kind}")
            if isinstance(exc, Timeout):
                self.run.rec.hang(f"{self.peer} (was frozen) {op} {key}: {exc}")
            return
        if not isinstance(exc, EXPECTED_ERRORS):
            self.run.rec.bug(f"{self.peer} {op} {key}: unexpected {exc.kind}: {exc}")
        self.run.rec.failure(key, self.peer, op, exc, self.run.ending.is_set())
        if isinstance(exc, DaemonUnavailable):
            self._await_exit(exc)

    def _await_exit(self, exc: CollnetError) -> None:
        """A DaemonUnavailable from a daemon that is going away ends the trainer.

        A daemon that lost the coordinator reconnects instead (and a peer the
        coordinator dropped comes back as a joiner): then the trainer goes on.
        """
        with contextlib.suppress(Exception):
            self.node.daemon.proc.wait(0.5)
        if self.node.gone():
            raise _OwnDaemonGone from exc
