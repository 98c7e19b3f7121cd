"""Container churn driver: disturb a running compose cluster, check the invariants.

Run by deploy/churn/run.sh once the cluster of deploy/docker-compose.yml is up
(three peers, a trainer beside each). It drives, one after another:

  kill      docker kill a peer (SIGKILL), later start it and its trainer again
  pause     docker pause a peer past the failure-detection time, then unpause
  netcut    docker network disconnect a peer, then connect it again
  restart   docker restart a peer (SIGTERM: a graceful leave), restart its trainer
  scale     start a fourth peer and trainer (compose profile "scale")

and checks, from the trainers' progress lines (one JSON object per outer step):

  * training continues: after every disturbance each peer that should be live
    reports a new outer step, in a world of the expected size, within the bound
    (--bound-s from the disturbance or the heal; --join-bound-s from starting a
    container), and the round never goes back (shared state lost);
  * the model hash is equal on every peer that reported the same outer step at
    the same revision (and every live peer reports the final steps);
  * failures are typed: a trainer that exits does so non-zero within the bound
    with a collnet error (PeerLost, DaemonUnavailable, ...) on stderr, no
    trainer prints a traceback of any other exception, every failed round
    names a collnet error; daemons and the coordinator never exit unless the
    test stopped them.

A trainer that exits is started again once its daemon is up, as a supervisor
would (its daemon leaves the world when its trainer is gone, so the others go
on, but the node does no work until then); a world that stalls
is unstuck the same way after the violation is recorded, so each disturbance
is judged on its own.

Only the docker and docker-compose commands and the standard library are used.
Prints a summary (and --json-out writes it); exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

# Fallback when the image cannot be asked (the hierarchy in collnet/errors.py).
KNOWN_ERRORS = [
    "CollnetError",
    "ProtocolError",
    "FrameTooLarge",
    "CodecError",
    "NonFiniteError",
    "PeerLost",
    "Timeout",
    "MismatchError",
    "CollectiveAborted",
    "DaemonUnavailable",
    "InvalidArgument",
    "AuthError",
]


def log(msg: str) -> None:
    print(f"[churn {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Report:
    """One outer_step progress line of a trainer."""

    service: str
    peer: str
    step: int
    revision: int
    hash: str
    world: int
    epoch: int
    t: float  # when docker received the line (host clock)
    error: str  # why the round applied no pseudo-gradient ("PeerLost: ..."), "" if it did


@dataclasses.dataclass
class Exit:
    service: str
    code: int
    t: float
    error: str  # the typed error named on stderr, "" if none


class Cluster:
    """docker / docker-compose for one compose project."""

    def __init__(self, compose: list[str], project: str, network: str) -> None:
        self.compose_cmd = [*compose, "-p", project]
        self.project = project
        self.network = network
        self._ids: dict[str, str] = {}
        self._ids_at = -1e9

    def compose(self, *args: str, check: bool = True, timeout_s: float = 300) -> str:
        return run([*self.compose_cmd, *args], check=check, timeout_s=timeout_s)

    def cid(self, service: str) -> str:
        """The id of the service's container (one docker ps per second, not one per call)."""
        if time.monotonic() - self._ids_at > 1.0:
            out = self.docker(
                "ps", "-a", "--no-trunc",
                "--filter", f"label=com.docker.compose.project={self.project}",
                "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}',
                check=False,
            )  # fmt: skip
            self._ids = {}
            for line in out.splitlines():
                cid, _, name = line.partition(" ")
                self._ids[name] = cid
            self._ids_at = time.monotonic()
        return self._ids.get(service, "")

    def forget_ids(self) -> None:
        self._ids_at = -1e9

    def docker(self, *args: str, check: bool = True, timeout_s: float = 120) -> str:
        return run(["docker", *args], check=check, timeout_s=timeout_s)

    def state(self, service: str) -> dict[str, object]:
        cid = self.cid(service)
        if not cid:
            return {}
        out = self.docker("inspect", "-f", "{{json .State}}", cid, check=False)
        try:
            state: dict[str, object] = json.loads(out)
            return state
        except json.JSONDecodeError:
            return {}

    def running(self, service: str) -> bool:
        st = self.state(service)
        return bool(st.get("Running")) and not st.get("Paused")


def run(cmd: list[str], check: bool = True, timeout_s: float = 120) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def parse_docker_time(stamp: str) -> float:
    # 2026-11-23T17:56:42.123456789Z: keep microseconds.
    head, _, frac = stamp.rstrip("Z").partition(".")
    when = dt.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    return when.timestamp() + float("0." + (frac or "0")[:6])


class Progress:
    """Reads the trainers' logs (docker logs --timestamps) and keeps every report."""

    def __init__(self, cluster: Cluster, services: Iterable[str], errors: list[str]) -> None:
        self.cluster = cluster
        self.services = list(services)
        self.errors = errors
        self.reports: dict[tuple[str, str, float, int], Report] = {}
        self.stderr: dict[str, list[str]] = defaultdict(list)
        self._stderr_seen: set[tuple[str, str]] = set()

    def poll(self) -> None:
        for service in self.services:
            cid = self.cluster.cid(service)
            if not cid:
                continue
            proc = subprocess.run(
                ["docker", "logs", "--timestamps", cid],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for line in proc.stdout.splitlines():
                stamp, _, text = line.partition(" ")
                if not text.startswith("{"):
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if obj.get("event") != "outer_step":
                    continue
                t = parse_docker_time(stamp)
                key = (service, cid, t, int(obj.get("step", -1)))
                if key not in self.reports:
                    self.reports[key] = Report(
                        service,
                        str(obj.get("peer")),
                        int(obj["step"]),
                        int(obj.get("revision", obj["step"])),
                        str(obj.get("hash")),
                        int(obj.get("world", 0)),
                        int(obj.get("epoch", -1)),
                        t,
                        str(obj.get("error") or ""),
                    )
            for line in proc.stderr.splitlines():
                if (cid, line) not in self._stderr_seen:
                    self._stderr_seen.add((cid, line))
                    self.stderr[service].append(line.partition(" ")[2])

    def of(self, service: str) -> list[Report]:
        return sorted((r for r in self.reports.values() if r.service == service), key=lambda r: r.t)

    def latest(self, service: str) -> Report | None:
        reports = self.of(service)
        return reports[-1] if reports else None

    def typed_error(self, service: str) -> tuple[str, str]:
        """The last collnet error type named on the trainer's stderr, and that line."""
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, self.errors)) + r")\b")
        for line in reversed(self.stderr.get(service, [])):
            m = pattern.search(line)
            if m:
                return m.group(1), line.strip()[:200]
        return "", ""

    def untyped_tracebacks(self) -> list[str]:
        """Traceback endings that are not collnet errors (a crash, not a typed failure)."""
        found = []
        for service, lines in self.stderr.items():
            in_tb = False
            for line in lines:
                if line.startswith("Traceback"):
                    in_tb = True
                    continue
                if in_tb and line and not line.startswith((" ", "\t")):
                    in_tb = False
                    name = line.split(":", 1)[0].rsplit(".", 1)[-1]
                    if name not in self.errors and name != "KeyboardInterrupt":
                        found.append(f"{service}: {line[:200]}")
        return found


class Churn:
    def __init__(self, args: argparse.Namespace, cluster: Cluster, errors: list[str]) -> None:
        self.args = args
        self.cluster = cluster
        self.errors = errors
        self.trainers = {f"peer{i}": f"trainer{i}" for i in range(1, 5)}
        self.progress = Progress(cluster, self.trainers.values(), errors)
        self.live: set[str] = {"peer1", "peer2", "peer3"}
        self.violations: list[str] = []
        self.events: list[dict[str, object]] = []
        self.exits: list[Exit] = []
        self.disturbed: str | None = None  # the peer the running disturbance is about
        self.reported_down: set[str] = set()  # services whose unexpected exit was reported
        self.notes: list[str] = []  # allowed but worth a look (a trainer gave up early)

    # -- checks ------------------------------------------------------------
    def violation(self, msg: str) -> None:
        log(f"VIOLATION: {msg}")
        self.violations.append(msg)

    def wait_until(self, cond: Callable[[], bool], since: float, bound_s: float) -> float | None:
        """Poll until cond() holds; the seconds from ``since`` to then, None past the bound."""
        while True:
            self.progress.poll()
            self.check_services()
            if cond():
                return time.time() - since
            if time.time() - since >= bound_s:
                return None
            time.sleep(self.args.poll_s)

    def check_services(self) -> None:
        """Daemons and the coordinator only stop when the test stops them. A trainer
        of an undisturbed live peer that exits must have failed typed; it is started
        again, as a supervisor would."""
        for service in ["coordinator", *sorted(self.live)]:
            st = self.cluster.state(service)
            if st and not st.get("Running") and service not in self.reported_down:
                code = int(str(st.get("ExitCode", -1)))
                self.violation(f"{service} exited on its own (exit code {code})")
                self.reported_down.add(service)
        for peer in sorted(self.live - {self.disturbed}):
            trainer = self.trainers[peer]
            st = self.cluster.state(trainer)
            if st and not st.get("Running") and self.cluster.running(peer):
                self.progress.poll()
                self.record_exit(f"{peer} undisturbed", trainer, int(str(st.get("ExitCode", -1))))
                self.note(f"{trainer} exited while its daemon {peer} was up: restarted it")
                self.cluster.docker("start", self.cluster.cid(trainer))

    def steps_after(self, peers: Iterable[str], since: float, world: int | None) -> bool:
        for peer in peers:
            ok = any(
                r.t > since and (world is None or r.world == world)
                for r in self.progress.of(self.trainers[peer])
            )
            if not ok:
                return False
        return True

    def expect_progress(
        self, label: str, since: float, world: int | None, bound_s: float | None = None
    ) -> None:
        """Every live peer reports an outer step (in a world of ``world``) after ``since``."""
        bound_s = self.args.bound_s if bound_s is None else bound_s
        peers = sorted(self.live)
        took = self.wait_until(lambda: self.steps_after(peers, since, world), since, bound_s)
        where = f"world {world}" if world else "any world"
        if took is None:
            late = [p for p in peers if not self.steps_after([p], since, world)]
            self.violation(
                f"{label}: {', '.join(late)} reported no outer step ({where}) "
                f"within {bound_s:.0f} s"
            )
        else:
            log(f"{label}: {', '.join(peers)} stepped on ({where}) {took:.1f} s after it")
        self.event(label, progress_s=None if took is None else round(took, 1), world=world)

    def expect_trainer_exit(self, label: str, peer: str, since: float) -> None:
        service = self.trainers[peer]

        def exited() -> bool:
            st = self.cluster.state(service)
            return bool(st) and not st.get("Running")

        took = self.wait_until(exited, since, self.args.bound_s)
        self.progress.poll()
        if took is None:
            self.violation(
                f"{label}: {service} still running {self.args.bound_s:.0f} s after its daemon "
                "went away (a hang)"
            )
            return
        st = self.cluster.state(service)
        self.record_exit(label, service, int(str(st.get("ExitCode", -1))), took)

    def record_exit(self, label: str, service: str, code: int, took: float | None = None) -> None:
        """A trainer's exit: non-zero, with a typed collnet error on stderr."""
        error, line = self.progress.typed_error(service)
        self.exits.append(Exit(service, code, time.time(), line or error))
        if code == 0:
            self.violation(f"{label}: {service} exited 0 (it should train on)")
        elif not error:
            tail = " | ".join(self.progress.stderr.get(service, [])[-3:])
            self.violation(f"{label}: {service} exited {code} with no typed error: {tail}")
        else:
            after = "" if took is None else f" after {took:.1f} s"
            log(f"{label}: {service} exited {code}{after}: {line}")

    def note(self, msg: str) -> None:
        log(f"note: {msg}")
        self.notes.append(msg)

    def event(self, kind: str, **fields: object) -> None:
        self.events.append({"event": kind, "t": round(time.time(), 3), **fields})

    # -- disturbances ------------------------------------------------------
    def start_pair(self, peer: str) -> None:
        """Start (again) a peer, then its trainer once the daemon is healthy, as compose
        would; the trainer joins (syncs the shared state) within the join bound."""
        t = time.time()
        self.cluster.compose("--profile", "scale", "up", "-d", "--no-build", "--no-recreate", peer)
        self.cluster.forget_ids()
        if self.wait_until(lambda: self.healthy(peer), t, self.args.join_bound_s) is None:
            self.violation(f"{peer} not healthy within {self.args.join_bound_s:.0f} s of its start")
        service = self.trainers[peer]
        cid = self.cluster.cid(service)
        if cid:
            self.cluster.docker("start", cid)
        else:
            self.cluster.compose(
                "--profile", "scale", "up", "-d", "--no-build", "--no-recreate", service
            )
            self.cluster.forget_ids()
        self.reported_down.discard(peer)
        self.live.add(peer)
        if self.disturbed == peer:
            # Started again: from now on its trainer is supervised like any other.
            self.disturbed = None

    def healthy(self, service: str) -> bool:
        st = self.cluster.state(service)
        health = st.get("Health")
        return isinstance(health, dict) and health.get("Status") == "healthy"

    def kill(self, peer: str) -> None:
        label = f"kill {peer}"
        log(f"{label}: docker kill (SIGKILL)")
        self.live.discard(peer)
        t = time.time()
        self.cluster.docker("kill", self.cluster.cid(peer))
        self.event(label)
        self.expect_trainer_exit(label, peer, t)
        self.expect_progress(label, t, world=len(self.live))
        log(f"{label}: starting {peer} and its trainer again (a rejoin)")
        t = time.time()
        self.start_pair(peer)
        self.expect_progress(f"{label}: rejoin", t, len(self.live), self.args.join_bound_s)

    def isolate(
        self, label: str, peer: str, cut: Callable[[], object], heal: Callable[[], object]
    ) -> None:
        """Freeze or cut ``peer`` for --pause-s: the others must go on without it
        (failure detection), and once healed it must be back in the world."""
        t = time.time()
        cut()
        self.live.discard(peer)
        self.event(label, seconds=self.args.pause_s)
        others = sorted(self.live)
        took = self.wait_until(
            lambda: self.steps_after(others, t, len(others)), t, self.args.pause_s
        )
        if took is not None:
            log(f"{label}: {', '.join(others)} stepped on without {peer} {took:.1f} s after it")
            self.event(f"{label}: others go on", progress_s=round(took, 1), world=len(others))
        time.sleep(max(0.0, t + self.args.pause_s - time.time()))
        heal()
        healed = time.time()
        self.live.add(peer)
        if took is None:
            self.live.discard(peer)
            self.expect_progress(f"{label}: others go on", t, world=len(others))
            self.live.add(peer)
        log(f"{label}: healed after {healed - t:.1f} s; {peer} must be back in the world")
        self.recover(label, peer, healed, daemon_restarted=False)

    def pause(self, peer: str) -> None:
        cid = self.cluster.cid(peer)
        log(f"pause {peer}: docker pause for {self.args.pause_s:.0f} s")
        self.isolate(
            f"pause {peer}",
            peer,
            lambda: self.cluster.docker("pause", cid),
            lambda: self.cluster.docker("unpause", cid),
        )

    def netcut(self, peer: str) -> None:
        cid, net = self.cluster.cid(peer), self.cluster.network
        log(f"netcut {peer}: docker network disconnect for {self.args.pause_s:.0f} s")
        self.isolate(
            f"netcut {peer}",
            peer,
            lambda: self.cluster.docker("network", "disconnect", net, cid),
            # The alias is the name the others dial (compose gives it; connect does not).
            lambda: self.cluster.docker("network", "connect", "--alias", peer, net, cid),
        )

    def recover(self, label: str, peer: str, since: float, daemon_restarted: bool) -> None:
        """After a freeze, a cut or a restart: every live peer steps in a world that has
        ``peer`` again, within the bound. A trainer may instead give up on its daemon
        (typed, within the bound): it is started again and must then join; a daemon
        that exited on its own is a violation (check_services)."""
        want = len(self.live)
        trainer = self.trainers[peer]
        took = self.wait_until(
            lambda: (
                self.steps_after(self.live, since, want)
                or not self.cluster.running(peer)
                or not self.cluster.running(trainer)
            ),
            since,
            self.args.bound_s,
        )
        if took is not None and self.steps_after(self.live, since, want):
            log(f"{label}: all of {', '.join(sorted(self.live))} in a world of {want} "
                f"{took:.1f} s after it")  # fmt: skip
            self.event(f"{label}: back", progress_s=round(took, 1), world=want)
            return
        if took is None:
            self.violation(
                f"{label}: {peer} not back in a world of {want} within {self.args.bound_s:.0f} s "
                "(and its trainer did not fail either: a stall)"
            )
            # Unstick the world so the next disturbance is judged on its own.
            log(f"{label}: restarting {trainer} to go on")
            self.cluster.docker("restart", "-t", "5", self.cluster.cid(trainer))
            self.expect_progress(f"{label}: after restarting {trainer}", time.time(), want,
                                 self.args.join_bound_s)  # fmt: skip
            return
        if not self.cluster.running(trainer):
            self.expect_trainer_exit(label, peer, since)
            if not daemon_restarted and self.cluster.running(peer):
                self.note(
                    f"{label}: {trainer} gave up although its daemon kept running "
                    f"({self.progress.typed_error(trainer)[1] or 'no typed error'})"
                )
            log(f"{label}: starting the {peer} pair again")
        restart_t = time.time()
        self.start_pair(peer)
        self.expect_progress(f"{label}: rejoin", restart_t, len(self.live), self.args.join_bound_s)

    def restart(self, peer: str) -> None:
        label = f"restart {peer}"
        log(f"{label}: docker restart (SIGTERM, graceful leave)")
        t = time.time()
        self.cluster.docker("restart", "-t", "30", self.cluster.cid(peer), timeout_s=120)
        self.event(label, restart_s=round(time.time() - t, 1))
        # Steps count from the restarted daemon on (older ones came from its first life).
        self.recover(label, peer, time.time(), daemon_restarted=True)

    def scale(self, peer: str) -> None:
        label = f"scale up {peer}"
        log(f"{label}: compose --profile scale up -d {peer} {self.trainers[peer]}")
        t = time.time()
        self.start_pair(peer)
        self.event(label)
        self.expect_progress(label, t, len(self.live), self.args.join_bound_s)

    # -- the run -----------------------------------------------------------
    def run(self) -> None:
        t0 = time.time()
        log(f"warm-up: waiting for every trainer's step {self.args.warmup_steps}")

        def warm() -> bool:
            return all(
                any(r.step >= self.args.warmup_steps for r in self.progress.of(self.trainers[p]))
                for p in self.live
            )

        took = self.wait_until(warm, t0, self.args.startup_s)
        if took is None:
            self.violation(f"no training progress within {self.args.startup_s:.0f} s of start")
            return
        log(f"warm-up done after {took:.1f} s")
        steps: list[tuple[str, Callable[[str], None]]] = [
            ("peer3", self.kill),
            ("peer2", self.pause),
            ("peer1", self.netcut),
            ("peer2", self.restart),
            ("peer4", self.scale),
        ]
        if self.args.rounds >= 2:  # the same again, on other peers, in a world of 4
            steps += [
                ("peer1", self.kill),
                ("peer4", self.pause),
                ("peer3", self.netcut),
                ("peer4", self.restart),
            ]
        for peer, step in steps:
            if self.violations and self.args.stop_on_violation:
                break
            self.disturbed = peer
            step(peer)
            self.disturbed = None
            self.check_hashes()
        # Every live peer reports some more steps, each with equal hashes.
        t = time.time()
        final = self.args.final_steps

        def done() -> bool:
            return all(
                sum(1 for r in self.progress.of(self.trainers[p]) if r.t > t) >= final
                for p in self.live
            )

        took = self.wait_until(done, t, self.args.join_bound_s)
        if took is None:
            self.violation(f"live peers did not report {final} more outer steps at the end")
        else:
            log(
                f"final: {', '.join(sorted(self.live))} reported {final} more steps in {took:.1f} s"
            )
        self.check_final_coverage(t)
        self.check_hashes()
        for line in self.progress.untyped_tracebacks():
            self.violation(f"untyped failure: {line}")
        for r in self.progress.reports.values():
            if r.error and r.error.split(":", 1)[0] not in self.errors:
                self.violation(f"untyped round error on {r.peer} at step {r.step}: {r.error}")
        self.event("end", seconds=round(time.time() - t0, 1))

    def generations(self) -> list[tuple[int, Report]]:
        """Reports in time order, each with its generation: a new one starts when the
        world's round goes back (every trainer holding the shared state had exited,
        so training started over from the initial model)."""
        out, gen, top = [], 0, -1
        for r in sorted(self.progress.reports.values(), key=lambda r: r.t):
            if r.step < top - 2:
                gen, top = gen + 1, -1
            top = max(top, r.step)
            out.append((gen, r))
        return out

    def check_hashes(self) -> None:
        by_step: dict[tuple[int, int, int], dict[str, set[str]]] = defaultdict(
            lambda: defaultdict(set)
        )
        restarts: dict[int, Report] = {}
        for gen, r in self.generations():
            by_step[(gen, r.step, r.revision)][r.hash].add(r.peer)
            restarts.setdefault(gen, r)
        for gen, first in sorted(restarts.items()):
            msg = (
                f"training started over at step {first.step} ({first.peer}, "
                f"{time.strftime('%H:%M:%S', time.localtime(first.t))}): the shared state "
                "was lost (every trainer that held it had exited)"
            )
            if gen and msg not in self.violations:
                self.violation(msg)
        for (_, step, rev), hashes in sorted(by_step.items()):
            if len(hashes) > 1:
                msg = f"hash mismatch at step {step} revision {rev}: " + "; ".join(
                    f"{h[:12]} on {','.join(sorted(p))}" for h, p in hashes.items()
                )
                if msg not in self.violations:
                    self.violation(msg)

    def check_final_coverage(self, since: float) -> None:
        """The last steps were reported by every live peer (so they were compared)."""
        steps: dict[tuple[int, int], set[str]] = defaultdict(set)
        for r in self.progress.reports.values():
            if r.t > since:
                steps[(r.step, r.revision)].add(r.peer)
        full = [k for k, peers in steps.items() if self.live <= peers]
        if not full:
            self.violation(f"no outer step at the end was reported by all of {sorted(self.live)}")

    def summary(self) -> dict[str, object]:
        reports = list(self.progress.reports.values())
        by_step: dict[tuple[int, int], set[str]] = defaultdict(set)
        for r in reports:
            by_step[(r.step, r.revision)].add(r.peer)
        round_errors: dict[str, int] = defaultdict(int)
        for r in reports:
            if r.error:
                round_errors[r.error.split(":", 1)[0]] += 1
        return {
            "ok": not self.violations,
            "round_errors": dict(round_errors),
            "violations": self.violations,
            "notes": self.notes,
            "outer_step_reports": len(reports),
            "steps_compared": sum(1 for peers in by_step.values() if len(peers) > 1),
            "max_step": max((r.step for r in reports), default=0),
            "live_at_end": sorted(self.live),
            "trainer_exits": [dataclasses.asdict(e) for e in self.exits],
            "events": self.events,
        }


def error_names(image: str) -> list[str]:
    code = (
        "import collnet.errors as e\n"
        "print(' '.join(n for n, c in vars(e).items() "
        "if isinstance(c, type) and issubclass(c, e.CollnetError)))"
    )
    try:
        out = run(["docker", "run", "--rm", "--network", "none", image, "python3", "-c", code])
        names = out.split()
        if names:
            return names
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log(f"could not list collnet errors from {image} ({exc}); using the built-in list")
    return list(KNOWN_ERRORS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True)
    ap.add_argument("--compose", default="docker-compose -f deploy/docker-compose.yml")
    ap.add_argument("--network", required=True, help="the compose network's docker name")
    ap.add_argument("--image", required=True, help="collnet image (to list the error types)")
    ap.add_argument(
        "--bound-s",
        type=float,
        default=30.0,
        help="From a disturbance to: the trainer of a lost daemon exiting typed, the others "
        "stepping on without it, a healed peer back in the world.",
    )
    ap.add_argument(
        "--join-bound-s",
        type=float,
        default=90.0,
        help="From starting a peer's containers to its trainer stepping in the world.",
    )
    ap.add_argument("--startup-s", type=float, default=300.0)
    ap.add_argument("--pause-s", type=float, default=8.0)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--final-steps", type=int, default=3)
    ap.add_argument("--poll-s", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1, choices=[1, 2])
    ap.add_argument("--stop-on-violation", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    cluster = Cluster(args.compose.split(), args.project, args.network)
    errors = error_names(args.image)
    churn = Churn(args, cluster, errors)
    try:
        churn.run()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        churn.violation(f"driver: {exc}")
    summary = churn.summary()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    print()
    print("== churn summary")
    for ev in churn.events:
        fields = ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("event", "t"))
        print(f"  {ev['event']}: {fields}")
    print(f"  rounds that failed typed and were retried: {summary['round_errors'] or 'none'}")
    for e in churn.exits:
        print(f"  trainer exit: {e.service} code {e.code} error {e.error or '-'}")
    print(
        f"  outer-step reports: {summary['outer_step_reports']}, steps compared across peers: "
        f"{summary['steps_compared']}, max step: {summary['max_step']}"
    )
    for n in churn.notes:
        print(f"  note: {n}")
    if churn.violations:
        print(f"FAIL: {len(churn.violations)} violation(s)")
        for v in churn.violations:
            print(f"  - {v}")
        return 1
    print("OK: training continued, hashes equal at every compared step, failures typed")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
