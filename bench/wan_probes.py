"""What the daemons' first bandwidth probes read of the WAN lab's links.

``python bench/wan_probes.py --rtt-ms 100 --clusters 4 --json`` builds the
lab of ``bench/wan.py`` (4 hosts, each access link ``--rate-mbit`` both ways,
``--rtt-ms`` round trip) and starts a fresh cluster in it ``--clusters``
times. Each cluster runs no collective: it waits until every ordered pair of
daemons has a bandwidth figure in the coordinator's matrix, which then comes
from the probe bursts alone (``collnet.topology.probe``), agrees on them
(update_topology) and stops. Every pair's links are the same, so each figure
should read the link; ``auto`` and the ring planner decide on the slowest
ones. It prints one JSON object: every figure in Mbit/s per cluster, the
agreed ring bottleneck and slowest pair, and over all of them the minimum,
median and the share under 80 % of the link.

``--after ALGO[,ALGO...]`` then keeps each cluster running: it runs
``--iters`` fp32 all-reduces of ``--size`` with each named schedule in turn,
waits ``REPORT_WAIT_S`` for the daemons' next link reports, and reads the
matrix again (``after`` in each cluster's object, with the samples and the
figures agreed at the end). Collective traffic refreshes the figures; a
schedule that shares a host's link among its links (the direct all-reduce)
must leave them where they were, not at its share of the link. ``sync`` in
that list runs ``--iters`` state syncs of ``--size`` instead, in which the
first trainer holds other bytes than the rest and fetches all of them,
striped over every other host (``_sync_series``): a fetch that shares its
host's link among its holders, which must leave the figures alone too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from collnet_lab.localcluster import parse_size
from wan import Collnet, collnet_in, log
from wanlab import Lab, LabSpec

LOW_SHARE = 0.8
# Two link-report intervals (2 s each by default): every daemon has reported since.
REPORT_WAIT_S = 5.0


def _figures(c: Collnet) -> list[float]:
    """Every bandwidth figure of the coordinator's matrix, Mbit/s, sorted."""
    rows = c.status().get("links") or []
    return sorted(round(r["bandwidth_bps"] / 1e6, 1) for r in rows if r.get("bandwidth_bps"))


def _sync_series(c: Collnet, nbytes: int, iters: int) -> list[float]:
    """``iters`` state syncs of one float32 tensor of ``nbytes``: the first trainer
    holds other bytes than the rest each time and fetches all of them; seconds each."""
    states = [{"w": comm.empty(nbytes // 4, np.float32)} for comm in c.comms]
    samples = []
    for i in range(iters):
        for k, state in enumerate(states):
            state["w"].fill(-1.0 if k == 0 else float(i))
        with ThreadPoolExecutor(len(states)) as pool:
            started = time.perf_counter()
            results = list(
                pool.map(
                    lambda k, rev=i + 1: c.comms[k].sync_state(states[k], rev, timeout_s=600),
                    range(len(states)),
                )
            )
            samples.append(round(time.perf_counter() - started, 3))
        if results[0].bytes_fetched != nbytes or not all(r.in_parity for r in results):
            raise RuntimeError(f"state sync {i}: {results}")
    return samples


def one_cluster(
    lab: Lab, connections: str, after: list[str], nbytes: int, iters: int
) -> dict[str, Any]:
    with collnet_in(lab, connections, []) as c:
        started = time.monotonic()
        known = c.await_matrix(limit_s=120)
        waited = time.monotonic() - started
        figures = _figures(c)
        c.agree()
        costs = c.costs()
        out: dict[str, Any] = {
            "pairs_measured": known,
            "waited_s": round(waited, 1),
            "mbit": figures,
            "agreed": None if costs is None else costs.to_wire(),
        }
        if after:
            out["after"] = {}
            for algo in after:
                if algo == "sync":
                    samples = _sync_series(c, nbytes, iters)
                else:
                    samples = c.time(nbytes, iters, "none", algo)
                time.sleep(REPORT_WAIT_S)
                out["after"][algo] = {"samples_s": samples, "mbit": _figures(c)}
                log(f"after {algo}: {out['after'][algo]['mbit']}")
            c.agree()
            costs = c.costs()
            out["agreed_after"] = None if costs is None else costs.to_wire()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--connections", default="auto")
    ap.add_argument("--after", default="", help="schedules (ring,direct) or sync after the probes")
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    spec = LabSpec(hosts=args.hosts, rate_bit=int(args.rate_mbit * 1e6), rtt_s=args.rtt_ms / 1e3,
                   name="wanp", subnet=236)  # fmt: skip
    runs = []
    with Lab(spec) as lab:
        after = [a for a in args.after.split(",") if a]
        nbytes = parse_size(args.size)
        for i in range(args.clusters):
            runs.append(one_cluster(lab, args.connections, after, nbytes, args.iters))
            log(f"cluster {i}: {runs[-1]['mbit']}")
    every = [f for run in runs for f in run["mbit"]]
    out = {
        "rtt_ms": args.rtt_ms,
        "link_mbit": args.rate_mbit,
        "hosts": args.hosts,
        "clusters": runs,
        "min_mbit": min(every, default=None),
        "median_mbit": statistics.median(every) if every else None,
        "under_80pct": round(sum(f < LOW_SHARE * args.rate_mbit for f in every) / len(every), 3)
        if every
        else None,
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
