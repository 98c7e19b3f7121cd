"""Small and medium all-reduces over the WAN lab: where the time goes.

What is measured
----------------
One ``wanlab`` lab (``--hosts`` namespaces, ``--rate-mbit`` access links,
``--rtt-ms``), the coordinator in the router's namespace and one daemon per
host (``bench/wan.py``'s ``Collnet``). For each algorithm in ``--algos`` and
size in ``--sizes`` it runs ``--iters`` all-reduces, each one its own
``bench_all_reduce`` call of one collective (timed inside the daemons,
preceded by the bench's small direct barrier, which every rank leaves
together), with ``--gap-s`` of idle time before each: a training step's
all-reduce comes after its compute, and idle time is what cools a TCP
connection. A sample is the slowest rank's time; every sample is reported
(none dropped), with the median and the best the links allow
(``predicted_s``): for the star ``2 * one-way`` plus the root receiving every
contribution of a chunk before it sends the results (``(N - 1) * (bytes +
min(bytes, 1 MiB chunk)) / rate``); for the ring ``2 (N - 1) * one-way +
2 (N - 1) / N * bytes / rate``; for ``direct`` (a reduce-scatter and an
all-gather of one hop each) ``2 * one-way + 2 (N - 1) / N * bytes / rate``.

``--ss FILE`` appends, after every sample, ``ss -tin`` of each host's
namespace (the daemons' TCP connections: cwnd, rwnd, pacing, BBR's model) so
a slow sample can be read against the state of the connections it used.

Needs root (network namespaces). Usage::

    python bench/wan_latency.py --json
    python bench/wan_latency.py --sizes 4KiB,1MiB,8MiB --algos star,ring --iters 6 --gap-s 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from collnet_lab.localcluster import parse_size
from wan import Collnet, collnet_in, log
from wanlab import Lab, LabSpec

# The daemon's default --chunk-bytes: the star's root sends a chunk's result once
# every contribution of that chunk has arrived.
CHUNK_BYTES = 1 << 20


def predicted_s(algo: str, nbytes: int, hosts: int, rate_bit: float, rtt_s: float) -> float:
    """The best the links allow as measured here (see the module docstring)."""
    one_way = rtt_s / 2
    if algo == "star":
        return 2 * one_way + (hosts - 1) * (nbytes + min(nbytes, CHUNK_BYTES)) * 8 / rate_bit
    hops = 2 if algo == "direct" else 2 * (hosts - 1)
    return hops * one_way + 2 * (hosts - 1) / hosts * nbytes * 8 / rate_bit


def one_sample(c: Collnet, count: int, algo: str, tag: str) -> float:
    """One collective (after its barrier), timed in every daemon: the slowest rank's time."""

    def rank(comm: Any) -> float:
        times: list[float] = comm.bench_all_reduce(count, tag=tag, iters=1, algo=algo,
                                                   timeout_s=600)  # fmt: skip
        return times[0]

    with ThreadPoolExecutor(len(c.comms)) as pool:
        return max(pool.map(rank, c.comms))


def snapshot(lab: Lab, path: Path, label: str) -> None:
    """``ss -tin`` of every host namespace, appended to ``path`` under ``label``."""
    with path.open("a") as f:
        f.write(f"=== {label} {time.time():.3f}\n")
        for h in range(lab.spec.hosts):
            r = subprocess.run(lab.cmd(h, "ss", "-tin", "state", "established"),
                               capture_output=True, text=True)  # fmt: skip
            f.write(f"--- host {h}\n{r.stdout}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = LabSpec(hosts=args.hosts, rate_bit=int(args.rate_mbit * 1e6), rtt_s=args.rtt_ms / 1e3,
                   mtu=args.mtu, name="wanlat", subnet=233)  # fmt: skip
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    algos = args.algos.split(",")
    ss = Path(args.ss) if args.ss else None
    out: dict[str, Any] = {"hosts": args.hosts, "rate_mbit": args.rate_mbit,
                           "rtt_ms": args.rtt_ms, "connections": args.connections,
                           "gap_s": args.gap_s, "daemon_arg": args.daemon_arg,
                           "host_sysctl": args.host_sysctl, "mtu": args.mtu}  # fmt: skip
    results: dict[str, Any] = {}
    with Lab(spec, args.delay_line) as lab:
        log(f"lab up: {args.hosts} hosts, {args.rate_mbit} Mbit/s, {args.rtt_ms} ms")
        for h in range(args.hosts):
            for setting in args.host_sysctl:
                subprocess.run(lab.cmd(h, "sysctl", "-qw", setting), check=True)
        with collnet_in(lab, args.connections, args.daemon_arg) as c:
            n = 0
            for nbytes in sizes:
                for algo in algos:
                    samples = []
                    for _ in range(args.iters):
                        time.sleep(args.gap_s)
                        n += 1
                        samples.append(one_sample(c, nbytes // 4, algo, f"lat-{n}"))
                        if ss is not None:
                            snapshot(lab, ss, f"{algo} {nbytes} sample {len(samples)}")
                    pred = predicted_s(algo, nbytes, args.hosts, args.rate_mbit * 1e6,
                                       args.rtt_ms / 1e3)  # fmt: skip
                    key = f"{algo}_{nbytes}"
                    results[key] = {
                        "median_s": round(statistics.median(samples), 4),
                        "predicted_s": round(pred, 4),
                        "samples_s": [round(x, 4) for x in samples],
                    }
                    log(f"{key}: median {results[key]['median_s']} s "
                        f"(links predict {pred:.3f} s) {results[key]['samples_s']}")  # fmt: skip
    out["results"] = results
    out["delay_line_stats"] = lab.final_stats
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--sizes", default="4KiB,1MiB")
    ap.add_argument("--algos", default="star,ring")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--gap-s", type=float, default=0.5, help="idle time before each collective")
    ap.add_argument("--connections", default="8", help="K (or auto)")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra daemon flag")
    ap.add_argument("--delay-line", choices=["auto", "c", "python"], default="auto")
    ap.add_argument(
        "--host-sysctl",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in every host's namespace before the daemons start "
        "(e.g. net.ipv4.tcp_congestion_control=cubic: a typical host)",
    )
    ap.add_argument("--mtu", type=int, default=65000, help="of every lab link")
    ap.add_argument("--ss", default="", help="append ss -tin snapshots to this file")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/wan_latency.py needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind: lab removed
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, r in result["results"].items():
            print(f"{key}: {r['median_s']} s (links: {r['predicted_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
