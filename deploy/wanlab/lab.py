"""Building and tearing down a lab: namespaces, veths, routes, the delay line.

Layout (addresses 10.<subnet>.<i+1>.0/24 for host i)::

    host i netns (wanlab-NAME-h<i>)        router netns (wanlab-NAME-r)
      eth0 10.S.<i+1>.2  <-- veth -->  h<i> 10.S.<i+1>.1
                                       dl0: TUN of the delay line process

The router sends every packet that arrives on a host link (``ip rule iif
h<i>``) to ``dl0``; the delay line writes it back after its delay, and the
main table forwards it out of the destination's link. Every device lives in
a lab namespace, so deleting the namespaces (after killing the processes in
them) leaves nothing behind; ``down`` does that for every namespace whose
name starts with the lab's prefix, which also cleans up after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from wanlab.delayline import DEVICE, build_c, c_matrix
from wanlab.shaping import shaping_commands
from wanlab.spec import LabSpec

STATE_DIR = Path(os.environ.get("WANLAB_STATE_DIR", "/run/wanlab"))
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)  # so children can -m wanlab.*
_TABLE = "100"
ENGINES = ("auto", "c", "python")


class LabError(RuntimeError):
    """A lab command failed (the message carries its stderr)."""


def sh(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
    return env


def namespaces(prefix: str) -> list[str]:
    out = sh("ip", "netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def _kill_all(nss: list[str], timeout_s: float = 5.0) -> None:
    """SIGTERM every process in the namespaces, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = set()
        for ns in nss:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            pids |= {int(p) for p in r.stdout.split()}
        pids.discard(os.getpid())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """False once the process is gone or a zombie (someone else's child, unreaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # ours: reap it
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _remove_namespaces(prefix: str) -> list[str]:
    nss = namespaces(prefix)
    _kill_all(nss)
    for ns in nss:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return nss


def _remove_state(prefix: str) -> None:
    name = prefix.removeprefix("wanlab-").rstrip("-")
    for f in STATE_DIR.glob(f"{name or '*'}.*"):
        f.unlink(missing_ok=True)


def down(prefix: str = "wanlab-") -> list[str]:
    """Remove every namespace starting with ``prefix``, what runs in it, and its state files."""
    nss = _remove_namespaces(prefix)
    _remove_state(prefix)
    return nss


class Lab:
    """One lab; ``with Lab(spec) as lab:`` builds it and always tears it down."""

    def __init__(self, spec: LabSpec, engine: str = "auto") -> None:
        """``engine``: the delay line's loop, ``c``, ``python``, or ``auto`` (C if it builds)."""
        if engine not in ENGINES:
            raise LabError(f"delay line engine {engine!r}: one of {', '.join(ENGINES)}")
        self.spec = spec
        self.engine = engine
        self.delay_line: subprocess.Popen[bytes] | None = None
        # The delay line's counters (packets, bytes, lost, foreign), once it is down.
        self.final_stats: dict[str, int] = {}

    # -- for benches and tests ---------------------------------------------------
    def cmd(self, host: int, *argv: str) -> list[str]:
        """argv run inside host's namespace."""
        return ["ip", "netns", "exec", self.spec.host_ns(host), *argv]

    def popen(self, host: int, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("env", child_env())
        return subprocess.Popen(self.cmd(host, *argv), **kw)  # type: ignore[call-overload,no-any-return]

    def file(self, suffix: str) -> Path:
        return STATE_DIR / f"{self.spec.name}.{suffix}"

    # -- lifecycle ---------------------------------------------------------------
    def up(self) -> Lab:
        if namespaces(self.spec.prefix):
            raise LabError(f"lab {self.spec.name!r} exists: python -m wanlab down first")
        try:
            self._build()
        except BaseException:
            down(self.spec.prefix)
            raise
        return self

    def down(self) -> None:
        _remove_namespaces(self.spec.prefix)
        if self.delay_line is not None:
            self.delay_line.wait()
        with contextlib.suppress(OSError, ValueError):
            self.final_stats = json.loads(self.file("stats.json").read_text())
        _remove_state(self.spec.prefix)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def _build(self) -> None:
        s = self.spec
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        r = s.router_ns
        sh("ip", "netns", "add", r)
        sh("ip", "-n", r, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1",
           "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")  # fmt: skip
        self.file("spec.json").write_text(json.dumps(s.to_json()))
        self._start_delay_line()
        sh("ip", "-n", r, "link", "set", DEVICE, "mtu", str(s.mtu), "up")
        sh("ip", "-n", r, "route", "add", "default", "dev", DEVICE, "table", _TABLE)
        for h in range(s.hosts):
            self._add_host(h)
        for c in shaping_commands(s):
            sh(*c)
        pid = self.delay_line.pid if self.delay_line else None
        self.file("json").write_text(json.dumps({"spec": s.to_json(), "delay_line_pid": pid}))

    def _start_delay_line(self) -> None:
        ready = self.file("ready")
        ready.unlink(missing_ok=True)
        stats = str(self.file("stats.json"))
        exe = build_c(STATE_DIR) if self.engine != "python" else None
        if exe is None and self.engine == "c":
            raise LabError("the C delay line does not build (is gcc installed?)")
        if exe is not None:
            self.file("matrix").write_text(c_matrix(self.spec))
            loop = [str(exe), DEVICE, str(ready), stats, str(self.file("matrix"))]
            self.engine = "c"
        else:
            spec = str(self.file("spec.json"))
            loop = [sys.executable, "-m", "wanlab.delayline", "--spec", spec]
            loop += ["--ready", str(ready), "--stats", stats]
            self.engine = "python"
        with open(self.file("delayline.log"), "wb") as log:
            self.delay_line = subprocess.Popen(
                ["ip", "netns", "exec", self.spec.router_ns, *loop],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(), start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.delay_line.poll() is not None:
                raise LabError(f"delay line exited: {self.file('delayline.log').read_text()}")
            if time.monotonic() > deadline:
                raise LabError("delay line not ready within 20 s")
            time.sleep(0.01)

    def _add_host(self, h: int) -> None:
        s = self.spec
        ns, r, dev = s.host_ns(h), s.router_ns, f"h{h}"
        sh("ip", "netns", "add", ns)
        # A host tuned for long links as docs/operations.md recommends, the same for
        # every program the lab runs (collnet, gloo): without it a connection idle
        # for longer than its RTO restarts from the initial window.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv4.tcp_slow_start_after_idle=0")  # fmt: skip
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "eth0", "mtu", str(s.mtu), "type", "veth",
           "peer", "name", dev, "netns", r)  # fmt: skip
        sh("ip", "-n", r, "link", "set", dev, "mtu", str(s.mtu), "up")
        sh("ip", "-n", r, "addr", "add", f"{s.gateway(h)}/24", "dev", dev)
        sh("ip", "-n", r, "rule", "add", "iif", dev, "table", _TABLE, "pref", "100")
        sh("ip", "-n", ns, "addr", "add", f"{s.addr(h)}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", s.gateway(h))
