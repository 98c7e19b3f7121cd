"""Timed all-reduces in the WAN lab beside what the kernel says of every connection.

``python bench/wan_stalls.py --rtt-ms 200 --samples 10 [--connections auto|K]``
builds the lab of ``bench/wan.py`` (4 hosts, ``--rate-mbit``, 1 Gbit/s by
default), runs ``--samples`` timed fp32 all-reduces of ``--size``
(``--algo``, ring by default) and, all the while, reads ``ss -tin`` in every
host's namespace every 30 ms. It prints one JSON object: the samples
(slowest rank, seconds), the connections per neighbour, the agreed link
figures, and per collective (a stretch of host 0 sending over 1 MB per read,
as it does only inside one) its length, the connections that sat at a
congestion window of at most 4 packets meanwhile, split by what ``ss`` says
of BBR: ``probe_rtt`` (cwnd gain 1: PROBE_RTT, 200 ms plus a round trip
every 10 s on a busy connection, with whatever it had queued) and
``low_cwnd_not_probe_rtt`` (loss recovery, say), and the bytes retransmitted
meanwhile on every host.

``--gap-s G`` idles G seconds before each timed collective, as a DiLoCo run
does between its all-reduces.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import threading
import time
from typing import Any, NamedTuple

from collnet_lab.localcluster import parse_size
from wan import Collnet, collnet_in
from wanlab import Lab, LabSpec

READ_EVERY_S = 0.03
# A host-0 read that moved this much belongs to a collective, not to heartbeats.
BUSY_BYTES = 1_000_000
PROBE_RTT_CWND = 4
_CONN = re.compile(
    r"(\d+\.\d+\.\d+\.\d+):(\d+)\s+(\d+\.\d+\.\d+\.\d+):(\d+)\s*\n(.*?)(?=\n\S|\Z)", re.S
)


class Conn(NamedTuple):
    """One data connection in an ``ss -tin`` reading."""

    local: str
    remote: str
    ports: str
    cwnd: int | None
    acked: int
    # BBR's cwnd gain: 1 only in PROBE_RTT (None: not shown).
    cwnd_gain: float | None
    retrans_bytes: int


def _int(pattern: str, body: str) -> int | None:
    m = re.search(pattern, body)
    return int(m.group(1)) if m else None


def _conns(out: str, router_suffix: str) -> list[Conn]:
    rows = []
    for m in _CONN.finditer(out):
        local, lport, remote, rport, body = m.groups()
        if local.endswith(router_suffix) or remote.endswith(router_suffix):
            continue  # the coordinator's control connection
        gain = re.search(r"cwnd_gain:([\d.]+)", body)
        rows.append(
            Conn(
                local, remote, f"{lport}>{rport}", _int(r"cwnd:(\d+)", body),
                _int(r"bytes_acked:(\d+)", body) or 0,
                float(gain.group(1)) if gain else None,
                _int(r"bytes_retrans:(\d+)", body) or 0,
            )
        )  # fmt: skip
    return rows


def _reader(ns: str, stop: threading.Event, into: list[tuple[float, str]]) -> None:
    while not stop.is_set():
        cmd = ["ip", "netns", "exec", ns, "ss", "-tin", "state", "established"]
        into.append((time.monotonic(), subprocess.run(cmd, capture_output=True, text=True).stdout))
        time.sleep(READ_EVERY_S)


def _collectives(reads: list[tuple[float, str]], router_suffix: str) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    start = last = None
    before = None
    for t, out in reads:
        total = sum(c.acked for c in _conns(out, router_suffix))
        busy = before is not None and total - before > BUSY_BYTES
        before = total
        if busy:
            start = t if start is None else start
            last = t
        elif start is not None and last is not None and t - last > 0.2:
            spans.append((start, last))
            start = last = None
    if start is not None and last is not None:
        spans.append((start, last))
    return spans


def _gapped(c: Collnet, nbytes: int, samples: int, gap_s: float, algo: str) -> list[float]:
    """``samples`` timed all-reduces (slowest rank), each after ``gap_s`` idle."""
    out = []
    for _ in range(samples):
        time.sleep(gap_s)
        out += c.time(nbytes, 1, algo=algo, warm_up=False)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = LabSpec(
        hosts=4,
        rate_bit=int(args.rate_mbit * 1e6),
        rtt_s=args.rtt_ms / 1e3,
        name="wans",
        subnet=234,
    )
    suffix = f".{spec.subnet}.1.1"
    reads: dict[int, list[tuple[float, str]]] = {h: [] for h in range(spec.hosts)}
    with Lab(spec) as lab, collnet_in(lab, args.connections, []) as c:
        c.await_matrix()
        c.agree()
        c.warm(args.nbytes)
        costs = c.costs()
        stop = threading.Event()
        readers = [
            threading.Thread(target=_reader, args=(spec.host_ns(h), stop, reads[h]))
            for h in range(spec.hosts)
        ]
        for r in readers:
            r.start()
        t0 = time.monotonic()
        try:
            if args.gap_s > 0:
                samples = _gapped(c, args.nbytes, args.samples, args.gap_s, args.algo)
            else:
                samples = c.time(args.nbytes, args.samples, algo=args.algo)
        finally:
            stop.set()
            for r in readers:
                r.join()
    last = reads[0][-1][1] if reads[0] else ""
    per_peer: dict[str, int] = {}
    for conn in _conns(last, suffix):
        per_peer[conn.remote] = per_peer.get(conn.remote, 0) + 1
    # (time, connection, in PROBE_RTT) for every reading at a congestion window
    # of at most 4 packets, and (time, retransmitted bytes since the last reading).
    stalls: list[tuple[float, str, bool]] = []
    retrans: list[tuple[float, int]] = []
    for rows in reads.values():
        seen: dict[str, int] = {}
        for t, out in rows:
            for conn in _conns(out, suffix):
                key = f"{conn.local}>{conn.remote}"
                if conn.cwnd is not None and conn.cwnd <= PROBE_RTT_CWND:
                    stalls.append((t, key, conn.cwnd_gain == 1))
                ident = f"{key}:{conn.ports}"
                if ident in seen and conn.retrans_bytes > seen[ident]:
                    retrans.append((t, conn.retrans_bytes - seen[ident]))
                seen[ident] = conn.retrans_bytes
    spans = []
    for a, b in _collectives(reads[0], suffix):
        inside = [(key, probe) for t, key, probe in stalls if a - 0.05 <= t <= b + 0.05]
        spans.append({
            "start_s": round(a - t0, 2), "busy_s": round(b - a, 2),
            "probe_rtt": sorted({key for key, probe in inside if probe}),
            "low_cwnd_not_probe_rtt": sorted({key for key, probe in inside if not probe}),
            "retrans_bytes": sum(n for t, n in retrans if a - 0.05 <= t <= b + 0.05),
        })  # fmt: skip
    return {
        "rtt_ms": args.rtt_ms,
        "connections": args.connections,
        "gap_s": args.gap_s,
        "connections_per_peer_host0": per_peer,
        "costs": None if costs is None else costs.to_wire(),
        "samples_s": [round(x, 4) for x in samples],
        "collectives": spans,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=200.0)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--algo", default="ring")
    ap.add_argument("--connections", default="auto")
    ap.add_argument("--gap-s", type=float, default=0.0, help="idle before each timed collective")
    args = ap.parse_args()
    args.nbytes = parse_size(args.size)
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
