"""The run of a chaos experiment: the cluster, the disturbance driver, the monitor.

``ChaosRun`` starts a ``LocalCluster`` and a trainer per daemon, and a driver
thread that every ``kill_every_s`` (jittered by the seeded RNG) kills a
daemon (``kill -9``), freezes one (``SIGSTOP``, later ``SIGKILL`` or
``SIGCONT``), starts a new one or restarts a killed one under its old peer
id. A monitor thread watches for split barriers. At the end it stops
everything it started and returns the summary (``collnet_lab.chaos.summary``).
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from collnet_lab.chaos.config import SPLIT_S, ChaosConfig
from collnet_lab.chaos.recorder import Recorder
from collnet_lab.chaos.rounds import References
from collnet_lab.chaos.summary import summarize
from collnet_lab.chaos.trainer import Node, Trainer
from collnet_lab.localcluster import DaemonProc, LocalCluster


class ChaosRun:
    """One chaos experiment: ``run()`` starts it, drives it and returns its summary."""

    def __init__(self, cfg: ChaosConfig) -> None:
        if cfg.peers < cfg.min_live:
            raise ValueError(f"--peers must be at least {cfg.min_live}")
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(1 << 31)
        self.rng = random.Random(self.seed)
        self.max_peers = cfg.max_peers or cfg.peers + 2
        self.refs = References(self.seed, cfg.nbytes // 4)
        self.nodes: list[Node] = []
        self.ending = threading.Event()
        self.cluster: LocalCluster | None = None
        self.logdir = Path(".")
        self.rec: Recorder = Recorder(time.monotonic(), None)
        self._frozen: tuple[Node, float, str] | None = None  # node, resolve time, then what

    # -- nodes -------------------------------------------------------------
    def _start_trainer(self, node: Node) -> None:
        trainer = node.loop = Trainer(self, node)
        node.trainer = threading.Thread(
            target=trainer.main, name=f"trainer-{node.peer_id}", daemon=True
        )
        node.trainer.start()

    def _spawn(self, peer_id: str | None) -> DaemonProc:
        """A new daemon process: a fresh peer id, or ``peer_id`` (a restart)."""
        cluster = self.cluster
        assert cluster is not None
        if peer_id is None:
            return cluster.add_daemon()
        # add_daemon names peers by index; a restart reuses an id. click keeps
        # the last of a repeated option, so a trailing --peer-id wins.
        base = cluster.extra_args
        cluster.extra_args = [*base, "--peer-id", peer_id]
        try:
            return cluster.add_daemon()
        finally:
            cluster.extra_args = base

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.state == "live" and not n.gone()]

    # -- the driver --------------------------------------------------------
    def _drive(self, until: float) -> None:
        cfg = self.cfg
        try:
            next_t = time.monotonic() + cfg.kill_every_s * self.rng.uniform(0.5, 1.5)
            while True:
                now = time.monotonic()
                if self._frozen is not None and now >= self._frozen[1]:
                    self._resolve_freeze()
                if now >= until:
                    break
                if now >= next_t:
                    self._act()
                    next_t = time.monotonic() + cfg.kill_every_s * self.rng.uniform(0.5, 1.5)
                    continue
                wake = min(next_t, until, self._frozen[1] if self._frozen else until)
                time.sleep(max(0.0, min(0.05, wake - now)))
            if self._frozen is not None:
                self._resolve_freeze()
        except BaseException as exc:
            tb = "".join(traceback.format_exception(exc))
            self.rec.bug(f"chaos driver: {exc!r}\n{tb}")

    def _act(self) -> None:
        for n in self.nodes:  # daemons that ended on their own
            if n.state == "live" and n.daemon.proc.poll() is not None:
                n.state = "exited"
        live = self.live()
        frozen = 1 if self._frozen is not None else 0
        dead = [n for n in self.nodes if n.state in ("killed", "exited") and not n.restarted]
        # One daemon per peer id: an id whose newest daemon still runs is taken.
        running = {n.peer_id for n in self.nodes if n.daemon.proc.poll() is None}
        dead = [n for n in dead if n.peer_id not in running]
        options: list[tuple[str, float]] = []
        if len(live) > self.cfg.min_live:
            options.append(("kill", 4.0))
            if not frozen:
                options.append(("freeze", 1.5))
        if len(live) + frozen < self.max_peers:
            options.append(("join", 1.5))
            if dead:
                options.append(("restart", 2.0))
        if not options:
            return
        kinds, weights = zip(*options, strict=True)
        kind = self.rng.choices(kinds, weights)[0]
        self.rec.action(kind)
        if kind == "kill":
            victim = self.rng.choice(live)
            victim.doomed.set()
            victim.state = "killed"
            self.rec.disturbed("kill", victim.peer_id, time.monotonic())
            victim.daemon.proc.send_signal(signal.SIGKILL)
            victim.daemon.proc.wait()
        elif kind == "freeze":
            victim = self.rng.choice(live)
            victim.state = "frozen"
            victim.ever_frozen = True
            hold = self.rng.uniform(1.0, 5.0)
            then = self.rng.choice(["kill", "resume"])
            self.rec.disturbed("freeze", victim.peer_id, time.monotonic())
            victim.daemon.proc.send_signal(signal.SIGSTOP)
            self._frozen = (victim, time.monotonic() + hold, then)
        else:
            old = self.rng.choice(dead) if kind == "restart" else None
            if old is not None:
                self.rec.restarted(old.peer_id, time.monotonic())
            try:
                d = self._spawn(old.peer_id if old is not None else None)
            except RuntimeError as exc:
                self.rec.anomaly(f"{kind} failed: {exc}")
                return
            if old is not None:
                old.restarted = True
            node = Node(d, d.peer_id, initial=False)
            self.nodes.append(node)
            self.rec.event("%s %s (daemon%d)", kind, d.peer_id, d.index)
            self._start_trainer(node)

    def _resolve_freeze(self) -> None:
        assert self._frozen is not None
        node, _, then = self._frozen
        self._frozen = None
        if then == "kill":
            node.doomed.set()
            node.state = "killed"
            node.daemon.proc.send_signal(signal.SIGKILL)
            node.daemon.proc.wait()
            self.rec.action("freeze_then_kill")
            self.rec.event("kill %s (frozen)", node.peer_id)
        else:
            node.resumed_at = time.monotonic()
            node.daemon.proc.send_signal(signal.SIGCONT)
            node.state = "live"
            self.rec.action("freeze_then_resume")
            self.rec.event("resume %s", node.peer_id)

    # -- the whole run -------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.cluster = cluster = LocalCluster(
            peers=cfg.peers,
            connections=cfg.connections,
            log_level=cfg.log_level,
            workdir=cfg.workdir,
            keep_workdir=True,
        )
        self.logdir = cluster.dir
        events = cluster.dir / "chaos-events.log"
        self.rec = rec = Recorder(time.monotonic(), events)
        started = time.monotonic()
        ok = False
        try:
            cluster.start()
            self.nodes = [Node(d, d.peer_id, initial=True) for d in cluster.daemons]
            rec.event("seed %d; started %s", self.seed, [n.peer_id for n in self.nodes])
            for node in self.nodes:
                self._start_trainer(node)
            t_chaos = time.monotonic()
            driver = threading.Thread(
                target=self._drive, args=(t_chaos + cfg.duration_s,), name="chaos-driver"
            )
            watched = threading.Event()
            monitor = threading.Thread(target=self._monitor, args=(watched,), name="chaos-monitor")
            driver.start()
            monitor.start()
            driver.join()
            peers_final = len(self.live())
            rec.event("chaos over; %d live peers; stopping", peers_final)
            self.ending.set()
            self._join_trainers()
            watched.set()
            monitor.join()
            summary = summarize(
                rec,
                cfg,
                self.seed,
                peers_final,
                time.monotonic() - t_chaos,
                str(cluster.dir),
            )
            ok = summary["ok"]
            return summary
        finally:
            self.ending.set()
            for n in self.nodes:
                n.doomed.set()
            for n in self.nodes:
                if n.daemon.proc.poll() is None and n.state == "frozen":
                    n.daemon.proc.send_signal(signal.SIGCONT)
            for n in self.nodes:
                if n.trainer is not None:
                    n.trainer.join(5.0)
            rec.event("stopped after %.1fs", time.monotonic() - started)
            rec.close()
            keep = cfg.keep_logs or not ok
            cluster.stop()
            if not keep and cfg.workdir is None:
                shutil.rmtree(cluster.dir, ignore_errors=True)

    def _monitor(self, done: threading.Event) -> None:
        """Watch for a split barrier: a member that never joins a round the others run.

        Trainer A runs the all-reduce of round (E, k) while trainer C, an
        undisturbed member of world E that has not taken part in (E, k), entered
        update_topology after A's all-reduce began and still waits there. C's
        barrier needs A, A's all-reduce needs C: only a timeout or the next
        membership change ends that. In a sound protocol the state lasts no
        longer than a reply takes to arrive.
        """
        seen: set[tuple[Any, ...]] = set()
        try:
            while not done.wait(0.25):
                now = time.monotonic()
                loops = [n.loop for n in self.nodes if n.loop is not None and not n.gone()]
                by_peer = {t.peer: t for t in loops if t.node.state == "live"}
                for a in loops:
                    key = a.key
                    if a.phase != "reduce" or key is None or now - a.since < SPLIT_S:
                        continue
                    r = self.rec.rounds.get(key)
                    for peer in r.peers if r is not None else ():
                        c = by_peer.get(peer)
                        if (
                            c is None
                            or c is a
                            or c.victim_view()
                            or c.phase != "barrier"
                            or c.last_key >= key
                            or c.since < a.since
                            or now - c.since < SPLIT_S
                            or (key, peer) in seen
                        ):
                            continue
                        seen.add((key, peer))
                        self.rec.stall(
                            f"split barrier: {a.peer} has been in the all-reduce of round {key} "
                            f"for {now - a.since:.1f}s while {peer}, a member of that world, "
                            f"waits in update_topology (for {now - c.since:.1f}s; its last "
                            f"round {c.last_key})"
                        )
        except BaseException as exc:
            tb = "".join(traceback.format_exception(exc))
            self.rec.bug(f"monitor: {exc!r}\n{tb}")

    def _join_trainers(self) -> None:
        # Every call is bounded by call_timeout_s and a trainer that fails keeps
        # retrying, so a few rounds of deadlines is far more than stopping needs.
        deadline = time.monotonic() + 2 * self.cfg.call_timeout_s + 5.0
        for n in self.nodes:
            if n.trainer is not None:
                n.trainer.join(max(0.0, deadline - time.monotonic()))
                if n.trainer.is_alive():
                    self.rec.hang(f"trainer {n.peer_id} did not stop by the end of the run")
                    n.doomed.set()
