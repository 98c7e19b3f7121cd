"""A coordinator and N daemons as real processes on loopback.

Used by ``collnet up``, the integration tests and the benchmarks. Every
process is started with a ready file, so start-up waits on a condition
rather than a sleep, and ``stop()`` always reaps what it started.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad size {text!r} (e.g. 64MiB, 4KiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class DaemonProc:
    index: int
    proc: subprocess.Popen[bytes]
    ipc: str
    peer_id: str = ""
    data: str = ""
    # HOST:PORT of its metrics endpoint, when started with --metrics-port.
    metrics: str = ""


@dataclass
class LocalCluster:
    peers: int = 4
    connections: int = 4
    extra_args: list[str] = field(default_factory=list)
    coordinator_args: list[str] = field(default_factory=list)
    # Passed to the coordinator and every daemon as --secret-file.
    secret_file: Path | None = None
    log_level: str = "warning"
    workdir: Path | None = None
    # A workdir this cluster made itself is removed by stop() unless kept.
    keep_workdir: bool = False
    _own_workdir: bool = False
    coordinator: subprocess.Popen[bytes] | None = None
    coordinator_addr: str = ""
    coordinator_metrics: str = ""
    daemons: list[DaemonProc] = field(default_factory=list)
    _next_index: int = 0

    def __post_init__(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="collnet-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir

    def _secret(self) -> list[str]:
        return ["--secret-file", str(self.secret_file)] if self.secret_file else []

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        logf = open(self.dir / log_name, "wb")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "collnet_daemon", "--log-level", self.log_level, *args],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            logf.close()

    def _await_ready(
        self, path: Path, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 30.0
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}; see {self.dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {timeout_s}s; see {self.dir}")
            time.sleep(0.02)
        info: dict[str, str] = json.loads(path.read_text())
        return info

    def start(self) -> LocalCluster:
        ready = self.dir / "coordinator.ready"
        self.coordinator = self._spawn(
            [
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                *self._secret(),
                *self.coordinator_args,
            ],
            "coordinator.log",
        )
        info = self._await_ready(ready, self.coordinator, "coordinator")
        self.coordinator_addr = info["address"]
        self.coordinator_metrics = info.get("metrics", "")
        for _ in range(self.peers):
            self.add_daemon()
        return self

    def restart_coordinator(self, sig: int = signal.SIGKILL) -> None:
        """Kill the coordinator and start a new one on the same address."""
        assert self.coordinator is not None
        self.coordinator.send_signal(sig)
        self.coordinator.wait(10)
        ready = self.dir / "coordinator.ready"
        ready.unlink(missing_ok=True)
        self.coordinator = self._spawn(
            [
                "coordinator",
                "--listen",
                self.coordinator_addr,
                "--ready-file",
                str(ready),
                *self._secret(),
                *self.coordinator_args,
            ],
            "coordinator.log",
        )
        self._await_ready(ready, self.coordinator, "coordinator")

    def add_daemon(self) -> DaemonProc:
        i = self._next_index
        self._next_index += 1
        ipc = f"ipc://{self.workdir}/daemon{i}.sock"
        ready = self.dir / f"daemon{i}.ready"
        proc = self._spawn(
            [
                "daemon",
                "--coordinator",
                self.coordinator_addr,
                "--ipc",
                ipc,  # (no TCP fallback: that is off unless asked for)
                "--connections",
                str(self.connections),
                "--peer-id",
                f"peer{i:02d}",
                "--ready-file",
                str(ready),
                *self._secret(),
                *self.extra_args,
            ],
            f"daemon{i}.log",
        )
        d = DaemonProc(i, proc, ipc)
        self.daemons.append(d)
        info = self._await_ready(ready, proc, f"daemon {i}")
        d.peer_id, d.data = info["peer"], info["data"]
        d.metrics = info.get("metrics", "")
        return d

    def kill(self, d: DaemonProc, sig: int = signal.SIGKILL) -> None:
        if d.proc.poll() is None:
            d.proc.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        procs = [d.proc for d in self.daemons]
        if self.coordinator is not None:
            procs.append(self.coordinator)
        for p in procs:  # daemons first, so they can announce their leave
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for f in sorted(self.dir.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
