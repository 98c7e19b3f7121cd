"""The run's bookkeeping: every count, divergence and failure, and whom it blames.

Trainers and the driver report to one ``Recorder``; it checks on the fly that
every member of a round was told the same world, got the same bytes and holds
the same state after the sync, and times every typed failure from the
disturbance that caused it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collnet.errors import CollnetError, PeerLost, Timeout
from collnet_lab.chaos.config import BLAME_WINDOW_S

log = logging.getLogger("collnet.chaos")


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
            if named is not None or t - d.t <= BLAME_WINDOW_S:
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
