"""Timed all-reduces in the WAN lab beside what the kernel says of every connection.

``python bench/wan_stalls.py --rtt-ms 200 --samples 10 [--connections auto|K]``
builds the lab of ``bench/wan.py`` (4 hosts, 1 Gbit/s), runs ``--samples``
timed fp32 all-reduces of ``--size`` (``--algo``, ring by default) and, all
the while, reads ``ss -tin`` in every host's namespace every 30 ms. It prints
one JSON object: the samples (slowest rank, seconds), the connections per
neighbour, the agreed link figures, and per collective (a stretch of host 0
sending over 1 MB per read, as it does only inside one) its length and the
connections that sat at a congestion window of at most 4 packets meanwhile:
TCP BBR's PROBE_RTT, which holds a busy connection there for 200 ms plus a
round trip every 10 s, and whatever that connection had queued with it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import threading
import time
from typing import Any

from collnet_lab.localcluster import parse_size
from wan import collnet_in
from wanlab import Lab, LabSpec

READ_EVERY_S = 0.03
# A host-0 read that moved this much belongs to a collective, not to heartbeats.
BUSY_BYTES = 1_000_000
PROBE_RTT_CWND = 4
_CONN = re.compile(
    r"(\d+\.\d+\.\d+\.\d+):\d+\s+(\d+\.\d+\.\d+\.\d+):\d+\s*\n(.*?)(?=\n\S|\Z)", re.S
)


def _conns(out: str, router_suffix: str) -> list[tuple[str, str, int | None, int]]:
    """(local, remote, cwnd, bytes_acked) per data connection in an ``ss -tin`` reading."""
    rows = []
    for m in _CONN.finditer(out):
        local, remote, body = m.groups()
        if local.endswith(router_suffix) or remote.endswith(router_suffix):
            continue  # the coordinator's control connection
        cwnd = re.search(r"cwnd:(\d+)", body)
        acked = re.search(r"bytes_acked:(\d+)", body)
        rows.append(
            (
                local,
                remote,
                int(cwnd.group(1)) if cwnd else None,
                int(acked.group(1)) if acked else 0,
            )
        )
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
        total = sum(acked for _, _, _, acked in _conns(out, router_suffix))
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = LabSpec(hosts=4, rate_bit=10**9, rtt_s=args.rtt_ms / 1e3, name="wans", subnet=234)
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
            samples = c.time(args.nbytes, args.samples, algo=args.algo)
        finally:
            stop.set()
            for r in readers:
                r.join()
    last = reads[0][-1][1] if reads[0] else ""
    per_peer: dict[str, int] = {}
    for _, remote, _, _ in _conns(last, suffix):
        per_peer[remote] = per_peer.get(remote, 0) + 1
    stalls = [
        (t, h, f"{local}>{remote}")
        for h, rows in reads.items()
        for t, out in rows
        for local, remote, cwnd, _ in _conns(out, suffix)
        if cwnd is not None and cwnd <= PROBE_RTT_CWND
    ]
    spans = []
    for a, b in _collectives(reads[0], suffix):
        during = sorted({conn for t, _, conn in stalls if a - 0.05 <= t <= b + 0.05})
        spans.append({"start_s": round(a - t0, 2), "busy_s": round(b - a, 2), "probe_rtt": during})
    return {
        "rtt_ms": args.rtt_ms,
        "connections": args.connections,
        "connections_per_peer_host0": per_peer,
        "costs": None if costs is None else costs.to_wire(),
        "samples_s": [round(x, 4) for x in samples],
        "collectives": spans,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=200.0)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--algo", default="ring")
    ap.add_argument("--connections", default="auto")
    args = ap.parse_args()
    args.nbytes = parse_size(args.size)
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
