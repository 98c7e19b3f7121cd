"""``collnet chaos``: real daemons doing checked all-reduces while a driver kills them.

A ``LocalCluster`` (a coordinator and N daemon processes on loopback) and one
trainer per daemon, each a thread of this process with its own ``Comm``. A
trainer loops over rounds:

1. ``update_topology()``: the barrier among the active members that also
   admits pending joiners; it returns the world of the round.
2. ``sync_state()`` of the trainer's shared state (a few tensors in shared
   memory at a revision): a joiner or a restarted peer starts from zeros at
   revision 0, a member whose last round failed is one revision behind, and
   both must fetch the newest state from the holders. Checked: the sync says
   every member is in parity, the bytes the trainer now holds hash to the
   digest it reported, and every member of the round reports the same digest;
3. an all-reduce of a tensor that depends only on (the trainer's peer id, the
   epoch, the round number in that epoch), so the numpy reference over exactly
   the peers of that world can be computed anywhere;
4. checks: the result equals the reference (exactly for the integer-valued
   half, within a float32 bound for the rest, within the quantization bound in
   uint8 rounds), and every participant of the round got the same bytes; then
   the state moves to the next revision by a deterministic function of the
   (bit-identical) result, as an outer optimizer step would.

A round is named by ``(epoch, k)``: ``k`` counts the rounds a trainer started
in that epoch and restarts at 0 in a new one. Every member of an epoch runs
the same rounds in it, so ``k`` is also the collective's tag.

A driver thread disturbs the cluster every ``kill_every_s`` (jittered by the
seeded RNG): ``kill -9`` a daemon, freeze one with ``SIGSTOP`` (and a few
seconds later ``SIGKILL`` or ``SIGCONT`` it), start a new daemon, or restart a
killed one under its old peer id. At least ``min_live`` daemons stay
untouched.

Bookkeeping: collectives completed; typed failures with the time from the
disturbance that caused them (``max_detect_s``: kill -9; ``max_detect_freeze_s``:
SIGSTOP); divergent results (must be 0); hangs (a call that ran into its
timeout; must be 0); stalls (must be 0): a call of an undisturbed trainer that
took longer than ``stall_s``, or a split barrier (a member waits in
``update_topology`` for peers that already run the round's all-reduce and wait
for it), which the next membership change would otherwise end before any
timeout; any other exception is a bug. At the end the trainers
agree to stop through the all-reduce itself (element 0 carries a stop vote,
so everyone who completes a round sees the same decision), leave gracefully,
and the cluster is stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import re
import shutil
import signal
import threading
import time
import traceback
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
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
from collnet_daemon.localcluster import DaemonProc, LocalCluster
from collnet_daemon.up import error_bound

log = logging.getLogger("collnet.chaos")

T = TypeVar("T")

# The failures a disturbance may legitimately cause on a survivor.
EXPECTED_ERRORS = (PeerLost, Timeout, DaemonUnavailable, CollectiveAborted)

# Detection bounds with the default heartbeat settings (floor 2 s): kill -9 is
# seen through socket errors; a frozen peer only through heartbeat silence.
KILL_DETECT_BOUND_S = 3.0
FREEZE_DETECT_BOUND_S = 6.0

# How long a split barrier (see ChaosRun._monitor) may last before it is a stall.
SPLIT_S = 2.0

# A failure that names no disturbed peer is blamed on the latest disturbance
# at most this long before it; otherwise it is "unattributed".
_BLAME_WINDOW_S = 10.0

_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: "60s", "2m", "500ms", "1.5h" or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"bad duration {text!r} (e.g. 60s, 2m, 500ms)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


@dataclass
class ChaosConfig:
    peers: int = 6
    duration_s: float = 60.0
    seed: int | None = None
    kill_every_s: float = 3.0
    nbytes: int = 1 << 20
    # Size of each trainer's shared state (synced every round).
    state_bytes: int = 4 << 20
    # Per-call deadline of every update_topology and all-reduce: a call that
    # runs into it is a hang.
    call_timeout_s: float = 20.0
    # A call of an undisturbed trainer that takes longer than this is a stall:
    # a wait no disturbance explains (a frozen peer is declared dead within
    # the freeze bound), which only the next membership change ended.
    stall_s: float = 8.0
    connections: int = 2
    # Every fourth round all-reduces in uint8 (bit-identity plus an error bound).
    quantized: bool = True
    min_live: int = 2
    # Most daemons alive at once (default: peers + 2).
    max_peers: int | None = None
    workdir: Path | None = None
    # Keep the cluster's logs (and this run's event log); also kept on failure.
    keep_logs: bool = False
    log_level: str = "warning"
    # Log every round of every trainer to the event log (large).
    trace: bool = False


# -- inputs and references ---------------------------------------------------


def _round_plan(k: int, quantized: bool) -> tuple[str, str]:
    """(codec, algorithm) of round ``k``: the same on every member of the epoch."""
    codec = "uint8" if quantized and k % 4 == 3 else "none"
    algo = "star" if k % 5 == 2 else "ring"
    return codec, algo


def peer_input(seed: int, peer: str, epoch: int, k: int, n: int, codec: str) -> npt.NDArray[Any]:
    """The tensor ``peer`` contributes to round ``(epoch, k)``.

    Codec none: the first half holds small integers (their float32 sum is
    exact in any order), the rest uniform floats in [-1, 1). Quantized rounds:
    uniform floats throughout (the codec's error bound assumes that range).
    """
    rng = np.random.default_rng([seed, zlib.crc32(peer.encode()), epoch, k])
    if codec != "none":
        out: npt.NDArray[Any] = rng.random(n, dtype=np.float32) * 2 - 1
        return out
    half = n // 2
    out = np.empty(n, np.float32)
    out[:half] = rng.integers(-8, 9, half)
    out[half:] = rng.random(n - half, dtype=np.float32) * 2 - 1
    return out


class _References:
    """The float64 reference sum of a round over its world; computed once, shared."""

    def __init__(self, seed: int, n: int) -> None:
        self.seed, self.n = seed, n
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[Any, ...], npt.NDArray[np.float64]] = OrderedDict()

    def get(self, epoch: int, k: int, peers: tuple[str, ...], codec: str) -> npt.NDArray[Any]:
        key = (epoch, k, peers, codec)
        with self._lock:
            ref = self._cache.get(key)
            if ref is None:
                ref = np.zeros(self.n, np.float64)
                for p in peers:
                    ref += peer_input(self.seed, p, epoch, k, self.n, codec)
                self._cache[key] = ref
                while len(self._cache) > 32:
                    self._cache.popitem(last=False)
            return ref


def check_result(
    res: npt.NDArray[Any], ref: npt.NDArray[Any], world: int, codec: str
) -> str | None:
    """Why ``res`` is not the all-reduce of the round, or None when it is."""
    if codec != "none":
        bound = error_bound(codec, world)
        err = float(np.max(np.abs(res.astype(np.float64) - ref)))
        return None if err <= bound else f"{codec} error {err:.3g} > bound {bound:.3g}"
    half = len(res) // 2
    votes = float(res[0])
    if not (votes == int(votes) and 0 <= votes <= world):
        return f"stop-vote slot holds {votes}, not an integer in [0, {world}]"
    exact = res[1:half].astype(np.float64)
    bad = np.flatnonzero(exact != ref[1:half])
    if bad.size:
        i = int(bad[0]) + 1
        return f"integer half differs at {bad.size} elements (first [{i}]: {res[i]} != {ref[i]})"
    atol = world * world * float(np.finfo(np.float32).eps)
    err = float(np.max(np.abs(res[half:].astype(np.float64) - ref[half:]), initial=0.0))
    return None if err <= atol else f"float half error {err:.3g} > {atol:.3g}"


# -- bookkeeping -------------------------------------------------------------


@dataclass
class Disturbance:
    kind: str  # "kill" or "freeze"
    peer: str
    t: float


@dataclass
class _Round:
    peers: tuple[str, ...]
    hashes: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    divergent: bool = False


class Recorder:
    """Everything the run counts; every method is thread-safe."""

    def __init__(self, t0: float, events: Path | None) -> None:
        self.t0 = t0
        self._lock = threading.Lock()
        self._events = events.open("a") if events is not None else None
        self.rounds: dict[tuple[int, int], _Round] = {}
        self.completed_calls = 0
        self.failed = 0
        self.failed_at_end = 0
        self.errors_by_kind: Counter[str] = Counter()
        self.detect: dict[str, list[float]] = {"kill": [], "freeze": []}
        self.unattributed: list[str] = []
        self.disturbances: list[Disturbance] = []
        self.actions: Counter[str] = Counter()
        self.joined = 0
        self.hangs: list[str] = []
        self.stalls: list[str] = []
        self.max_call_s: dict[str, float] = {}
        self.divergences: list[str] = []
        self.bugs: list[str] = []
        self.anomalies: list[str] = []
        self.victim_errors: Counter[str] = Counter()
        # (epoch, k) -> peer -> the state digest it holds after that round's sync
        self.syncs: dict[tuple[int, int], dict[str, str]] = {}
        self.synced_calls = 0
        self.fetched_bytes = 0
        self.state_divergences: list[str] = []

    def event(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        text = msg % args if args else msg
        log.log(level, "%s", text)
        if self._events is not None:
            with self._lock:
                self._events.write(f"{time.monotonic() - self.t0:8.3f} {text}\n")
                self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()

    # -- the driver's side -------------------------------------------------
    def disturbed(self, kind: str, peer: str, t: float) -> None:
        with self._lock:
            self.disturbances.append(Disturbance(kind, peer, t))
        self.event("%s %s", kind, peer)

    def action(self, kind: str) -> None:
        with self._lock:
            self.actions[kind] += 1

    # -- the trainers' side ------------------------------------------------
    def admitted(self, peer: str) -> None:
        with self._lock:
            self.joined += 1
        self.event("%s admitted", peer)

    def world_of(self, key: tuple[int, int], peers: tuple[str, ...], me: str) -> None:
        with self._lock:
            r = self.rounds.setdefault(key, _Round(peers))
            if r.peers != peers and not r.divergent:
                r.divergent = True
                self.divergences.append(
                    f"round {key}: {me} was told world {list(peers)}, "
                    f"another member {list(r.peers)}"
                )

    def completed(self, key: tuple[int, int], peer: str, digest: int, problem: str | None) -> None:
        with self._lock:
            before = len(self.divergences)
            self.completed_calls += 1
            r = self.rounds[key]
            first = next(iter(r.hashes.values()), None)
            r.hashes[peer] = digest
            if problem is not None:
                r.divergent = True
                self.divergences.append(f"round {key} on {peer}: {problem}")
            elif first is not None and digest != first:
                r.divergent = True
                self.divergences.append(
                    f"round {key}: {peer}'s result differs from {next(iter(r.hashes))}'s"
                )
            new = self.divergences[before:]
        for line in new:
            self.event("DIVERGENT %s", line, level=logging.ERROR)

    def synced(
        self, key: tuple[int, int], peer: str, digest: str, fetched: int, problem: str | None
    ) -> None:
        with self._lock:
            self.synced_calls += 1
            self.fetched_bytes += fetched
            held = self.syncs.setdefault(key, {})
            other = next(iter(held.items()), None)
            held[peer] = digest
            if problem is None and other is not None and other[1] != digest:
                problem = f"its state digest {digest[:12]} differs from {other[0]}'s"
            if problem is not None:
                self.state_divergences.append(f"sync {key} on {peer}: {problem}")
        if problem is not None:
            self.event("DIVERGENT STATE sync %s on %s: %s", key, peer, problem, level=logging.ERROR)

    def failure(
        self, key: tuple[int, int] | None, peer: str, op: str, exc: CollnetError, end: bool
    ) -> None:
        t = time.monotonic()
        with self._lock:
            self.errors_by_kind[exc.kind] += 1
            if key is not None and key in self.rounds:
                self.rounds[key].failed.add(peer)
            if end:
                self.failed_at_end += 1
            else:
                self.failed += 1
            if isinstance(exc, Timeout):
                self.hangs.append(f"{peer} {op} {key}: {exc}")
            cause = self._blame(exc, t)
            if cause is not None:
                self.detect[cause.kind].append(t - cause.t)
            elif not end:
                self.unattributed.append(f"{peer} {op} {key}: {exc.kind}: {exc}")
        blame = f" ({cause.kind} {cause.peer} {t - cause.t:.3f}s before)" if cause else ""
        self.event("%s %s %s failed: %s: %s%s", peer, op, key, exc.kind, exc, blame)

    def _blame(self, exc: CollnetError, t: float) -> Disturbance | None:
        """The disturbance that caused a failure at ``t``, if one did.

        A ``PeerLost`` naming a peer blames that peer's latest disturbance, unless
        the peer was restarted (under its old id) since: the failure then names a
        live daemon. Other failures blame the latest disturbance shortly before.
        """
        named = exc.fields.get("peer") if isinstance(exc, PeerLost) else None
        for d in reversed(self.disturbances):
            if d.t > t or (named is not None and d.peer != named):
                continue
            if d.kind == "restart":
                if named is not None:
                    return None
                continue
            if named is not None or t - d.t <= _BLAME_WINDOW_S:
                return d
            return None
        return None

    def restarted(self, peer: str, t: float) -> None:
        with self._lock:
            self.disturbances.append(Disturbance("restart", peer, t))

    def victim(self, peer: str, what: str) -> None:
        with self._lock:
            self.victim_errors[what] += 1
        self.event("%s (disturbed): %s", peer, what)

    def call_took(self, op: str, seconds: float) -> None:
        with self._lock:
            self.max_call_s[op] = max(self.max_call_s.get(op, 0.0), seconds)

    def stall(self, what: str) -> None:
        with self._lock:
            self.stalls.append(what)
        self.event("STALL %s", what, level=logging.ERROR)

    def hang(self, what: str) -> None:
        with self._lock:
            self.hangs.append(what)
        self.event("HANG %s", what, level=logging.ERROR)

    def bug(self, what: str) -> None:
        with self._lock:
            self.bugs.append(what)
        self.event("BUG %s", what, level=logging.ERROR)

    def anomaly(self, what: str) -> None:
        with self._lock:
            self.anomalies.append(what)
        self.event("ANOMALY %s", what, level=logging.WARNING)


# -- trainers ----------------------------------------------------------------


class _OwnDaemonGone(Exception):
    """The trainer's own daemon was killed (or exited): the trainer ends with it."""


class _TrainerComm(Comm):
    """A ``Comm`` whose waits also end when this harness knows the daemon is gone.

    The SDK cannot tell a dead daemon from a slow one: it would wait out the
    whole call timeout. A trainer would die with its node; here it is a thread,
    so its wait is cut short once its daemon was killed or has exited.
    """

    def __init__(self, address: str, timeout_s: float, gone: Callable[[], bool]) -> None:
        self._gone = gone
        super().__init__(address, timeout_s)

    def _wait_reply(self, rid: int, timeout_s: float | None) -> dict[str, Any]:
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                if rid not in self._replies:
                    self._drain(50)
                if rid in self._replies:
                    break
            if self._gone():
                raise _OwnDaemonGone
            if time.monotonic() > deadline:
                raise Timeout(f"no reply from the daemon at {self.address} within {limit:.1f}s")
        return super()._wait_reply(rid, 0.0)


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
    """The loop of one trainer thread; see the module docstring."""

    def __init__(self, run: ChaosRun, node: Node) -> None:
        self.run = run
        self.node = node
        self.peer = node.peer_id
        self.comm: _TrainerComm | None = None
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
            self.comm = comm = _TrainerComm(self.node.daemon.ipc, timeout, self.node.gone)
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
            codec, algo = _round_plan(key[1], cfg.quantized)
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

    def _victim_view(self) -> bool:
        """Its own daemon is (or was just) frozen: its calls see the victim's side."""
        n = self.node
        return n.state == "frozen" or (
            n.resumed_at is not None and time.monotonic() - n.resumed_at < _BLAME_WINDOW_S
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
            if not self._victim_view() and not self.node.gone():
                rec.call_took(op, took)
                if took > self.run.cfg.stall_s:
                    rec.stall(f"{self.peer} {op} {key} took {took:.1f}s")

    def _failed(self, key: tuple[int, int] | None, op: str, exc: CollnetError) -> None:
        n = self.node
        if n.gone():
            raise _OwnDaemonGone from exc
        if self._victim_view():
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


# -- the run -----------------------------------------------------------------


class ChaosRun:
    def __init__(self, cfg: ChaosConfig) -> None:
        if cfg.peers < cfg.min_live:
            raise ValueError(f"--peers must be at least {cfg.min_live}")
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(1 << 31)
        self.rng = random.Random(self.seed)
        self.max_peers = cfg.max_peers or cfg.peers + 2
        self.refs = _References(self.seed, cfg.nbytes // 4)
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
            summary = self._summary(peers_final, time.monotonic() - t_chaos)
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
                            or c._victim_view()
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

    def _summary(self, peers_final: int, duration_s: float) -> dict[str, Any]:
        rec = self.rec
        rounds = rec.rounds.values()
        completed = sum(1 for r in rounds if r.hashes)
        split = sum(1 for r in rounds if r.hashes and r.failed)
        kill = rec.detect["kill"]
        freeze = rec.detect["freeze"]
        max_detect = max(kill, default=0.0)
        max_freeze = max(freeze, default=0.0)
        divergent_states = len(rec.state_divergences)
        divergent = sum(1 for r in rounds if r.divergent) + divergent_states
        summary: dict[str, Any] = {
            "completed": completed,
            "completed_calls": rec.completed_calls,
            "failed": rec.failed,
            "failed_collectives": sum(1 for r in rounds if r.failed),
            "split": split,
            "killed": rec.actions["kill"] + rec.actions["freeze_then_kill"],
            "frozen": rec.actions["freeze"],
            "resumed": rec.actions["freeze_then_resume"],
            "added": rec.actions["join"],
            "restarted": rec.actions["restart"],
            "joined": rec.joined,
            "max_detect_s": round(max_detect, 4),
            "max_detect_freeze_s": round(max_freeze, 4),
            "detect_bound_s": KILL_DETECT_BOUND_S,
            "freeze_detect_bound_s": FREEZE_DETECT_BOUND_S,
            "divergent": divergent,
            "divergent_states": divergent_states,
            "syncs": len(rec.syncs),
            "sync_calls": rec.synced_calls,
            "sync_fetched_bytes": rec.fetched_bytes,
            "hangs": len(rec.hangs),
            "stalls": len(rec.stalls),
            "max_call_s": {k: round(v, 3) for k, v in sorted(rec.max_call_s.items())},
            "errors_by_kind": dict(rec.errors_by_kind),
            "unattributed_failures": len(rec.unattributed),
            "failed_at_end": rec.failed_at_end,
            "victim_errors": dict(rec.victim_errors),
            "bugs": len(rec.bugs),
            "anomalies": len(rec.anomalies),
            "peers": self.cfg.peers,
            "peers_final": peers_final,
            "duration_s": round(duration_s, 2),
            "seed": self.seed,
            "bytes": self.cfg.nbytes,
            "state_bytes": self.cfg.state_bytes,
        }
        details = {
            "hang_details": rec.hangs,
            "stall_details": rec.stalls,
            "divergence_details": rec.divergences + rec.state_divergences,
            "bug_details": rec.bugs,
            "anomaly_details": rec.anomalies,
            "unattributed_details": rec.unattributed,
        }
        summary.update({k: v[:10] for k, v in details.items() if v})
        summary["ok"] = not (divergent or rec.hangs or rec.stalls or rec.bugs or rec.anomalies)
        if not summary["ok"] or self.cfg.keep_logs:
            summary["logs"] = str(self.cluster.dir) if self.cluster is not None else None
        return summary


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Run one chaos experiment; its summary (``summary["ok"]``: every invariant held)."""
    return ChaosRun(cfg).run()


def _fmt_calls(max_call_s: dict[str, float]) -> str:
    return ", ".join(f"{op} {t:.2f} s" for op, t in max_call_s.items()) or "-"


def print_table(s: dict[str, Any]) -> None:
    mib = s["bytes"] / 2**20
    print(
        f"collnet chaos: {s['peers']} peers, {s['duration_s']:.1f} s, seed {s['seed']}, "
        f"{mib:g} MiB float32 all-reduces, loopback"
    )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_kind"].items())) or "-"
    rows = [
        ("collectives completed", f"{s['completed']} ({s['completed_calls']} calls)"),
        ("failed calls (typed)", f"{s['failed']} ({kinds})"),
        ("  split rounds", f"{s['split']} (completed on some members, failed on others)"),
        ("  unattributed", str(s["unattributed_failures"])),
        ("  during the stop", str(s["failed_at_end"])),
        ("killed (kill -9)", str(s["killed"])),
        ("frozen (SIGSTOP)", f"{s['frozen']} ({s['resumed']} resumed)"),
        ("added / restarted", f"{s['added']} / {s['restarted']}"),
        ("joined (admitted)", str(s["joined"])),
        ("max detect, kill -9", f"{s['max_detect_s']:.3f} s (bound {s['detect_bound_s']:g} s)"),
        (
            "max detect, SIGSTOP",
            f"{s['max_detect_freeze_s']:.3f} s (bound {s['freeze_detect_bound_s']:g} s)",
        ),
        ("divergent", str(s["divergent"])),
        ("hangs", str(s["hangs"])),
        ("stalls", f"{s['stalls']} (max call {_fmt_calls(s['max_call_s'])})"),
        ("bugs / anomalies", f"{s['bugs']} / {s['anomalies']}"),
        ("peers at the end", str(s["peers_final"])),
        (
            "state syncs",
            f"{s['syncs']} ({s['sync_calls']} calls, {s['sync_fetched_bytes'] / 2**20:.1f} MiB "
            f"fetched, {s['divergent_states']} divergent)",
        ),
    ]
    for name, value in rows:
        print(f"  {name:<22} {value}")
    for key in (
        "hang_details",
        "stall_details",
        "divergence_details",
        "bug_details",
        "anomaly_details",
    ):
        for line in s.get(key, []):
            print(f"  ! {line}")
    if s.get("logs"):
        print(f"  logs: {s['logs']}")
    print("result:", "OK" if s["ok"] else "FAILED")


def main(cfg: ChaosConfig, as_json: bool) -> int:
    """Run, print the summary (a table, or one JSON object); the exit status."""
    summary = run_chaos(cfg)
    if as_json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return 0 if summary["ok"] else 1


__all__ = [
    "ChaosConfig",
    "ChaosRun",
    "check_result",
    "main",
    "parse_duration",
    "peer_input",
    "run_chaos",
]
