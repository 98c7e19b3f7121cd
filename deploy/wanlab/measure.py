"""Measuring a lab from the inside: RTT and rate seen by TCP, and the delay line's ceiling.

``Probes`` starts ``wanlab.probe serve`` on every host; ``ping`` and ``blast``
run the clients in a host's namespace. ``ceiling`` builds a lab with nothing
shaped (so only the delay line limits), blasts every host to the next one at
once (the traffic a ring all-reduce makes; 16 streams each, so that TCP
windows do not cap a flow at high RTT), and reports the aggregate rate, the
delay line's CPU share, and the RTT TCP sees, idle and beside the flows,
against the setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from wanlab.lab import Lab, child_env
from wanlab.spec import LabSpec

PORT = 5201


def _run_json(argv: list[str], timeout_s: float) -> dict[str, Any]:
    r = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-6:])} failed: {r.stderr.strip()[-2000:]}")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


class Probes:
    """A probe server on every host of ``lab`` (stopped on exit)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Probes:
        s = self.lab.spec
        try:
            for h in range(s.hosts):
                ready = self.lab.file(f"probe{h}.ready")
                ready.unlink(missing_ok=True)
                self.procs.append(
                    self.lab.popen(h, sys.executable, "-m", "wanlab.probe", "serve",
                                   "--listen", f"{s.addr(h)}:{PORT}", "--ready", str(ready),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )  # fmt: skip
                deadline = time.monotonic() + 20
                while not ready.exists():
                    if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"probe server on host {h} did not start")
                    time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()
        self.procs.clear()

    def ping(self, a: int, b: int, count: int = 20) -> dict[str, Any]:
        to = f"{self.lab.spec.addr(b)}:{PORT}"
        cmd = self.lab.cmd(a, sys.executable, "-m", "wanlab.probe", "ping", "--to", to)
        return _run_json([*cmd, "--count", str(count)], 60 + count)

    def blast(
        self, pairs: list[tuple[int, int]], seconds: float, streams: int = 1
    ) -> list[dict[str, Any]]:
        """All pairs at once; one result per pair, in order."""

        def one(ab: tuple[int, int]) -> dict[str, Any]:
            to = f"{self.lab.spec.addr(ab[1])}:{PORT}"
            cmd = self.lab.cmd(ab[0], sys.executable, "-m", "wanlab.probe", "blast", "--to", to)
            return _run_json(
                [*cmd, "--seconds", str(seconds), "--streams", str(streams)], 120 + seconds
            )

        with ThreadPoolExecutor(len(pairs)) as pool:
            return list(pool.map(one, pairs))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ceiling(
    hosts: int, rtt_s: float, *, seconds: float = 4.0, streams: int = 16, name: str = "ceil",
    subnet: int = 202, mtu: int = 65000, engine: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """What the delay line carries with ``hosts`` ring flows at ``rtt_s``, nothing shaped."""
    spec = LabSpec(hosts=hosts, rate_bit=None, rtt_s=rtt_s, name=name, subnet=subnet, mtu=mtu)
    ring = [(h, (h + 1) % hosts) for h in range(hosts)]
    with Lab(spec, engine) as lab, Probes(lab) as probes:
        assert lab.delay_line is not None
        rtt = probes.ping(0, 1, count=30)
        cpu0, t0 = _cpu_s(lab.delay_line.pid), time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            # Pings beside the flows (they pass the same delay line): jitter under load.
            loaded = pool.submit(probes.ping, 1, 0, max(5, int(seconds / (rtt_s + 0.01))))
            flows = probes.blast(ring, seconds, streams)
            cpu = (_cpu_s(lab.delay_line.pid) - cpu0) / (time.monotonic() - t0)
            rtt_loaded = loaded.result()
    total = sum(f["mbit"] for f in flows)
    return {
        "hosts": hosts,
        "engine": lab.engine,
        "rtt_set_ms": round(rtt_s * 1e3, 3),
        "streams_per_flow": streams,
        "total_mbit": round(total, 1),
        "per_flow_mbit": [f["mbit"] for f in flows],
        "delay_line_cpu": round(cpu, 3),
        "rtt_median_ms": rtt["median_ms"],
        "rtt_min_ms": rtt["min_ms"],
        "rtt_max_ms": rtt["max_ms"],
        "added_jitter_ms": round(rtt["max_ms"] - rtt["min_ms"], 3),
        "loaded_rtt_median_ms": rtt_loaded["median_ms"],
        "loaded_rtt_max_ms": rtt_loaded["max_ms"],
    }
