"""Broadcast, all-gather, reduce-scatter and barrier latency: collnet vs torch.distributed gloo.

Both run as one process per rank on loopback: collnet ranks are SDK clients
of a local cluster's daemons (a coordinator and ``--peers`` daemons), gloo
ranks a ``gloo`` process group, started by this script, which is also their
worker (``--worker``). Each rank runs, per collective and size, ``--warmup``
untimed calls and then ``--iters`` timed ones, each preceded by an untimed
barrier so a time covers one collective, not the ranks' skew. A sample is
the slowest rank's time for that iteration; the report gives medians and the
ratio collnet / gloo (below 1: collnet faster). Tensors are float32; SIZE is
bytes per rank's input for broadcast and reduce-scatter, and the gathered
output for all-gather (each rank contributing SIZE / peers).

    python bench/collectives.py --peers 4 --sizes 4KiB,1MiB,16MiB --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
KINDS = ("broadcast", "all_gather", "reduce_scatter", "barrier")
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "B": 1}


def parse_size(text: str) -> int:
    for unit, mult in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def _jobs(sizes: list[int]) -> list[tuple[str, int]]:
    """(collective, bytes) pairs, run in this order on every rank; barrier once."""
    return [(k, nb) for nb in sizes for k in KINDS if k != "barrier"] + [("barrier", 0)]


def _time_series(
    call: Callable[[], object], barrier: Callable[[], object], warmup: int, iters: int
) -> list[float]:
    times = []
    for i in range(warmup + iters):
        barrier()
        t0 = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------- workers


def gloo_worker(args: argparse.Namespace) -> dict[str, Any]:
    import datetime

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore", FutureWarning)  # reduce_scatter_tensor's rename
    dist.init_process_group(
        "gloo",
        init_method=args.init,
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=300),
    )
    world, out = args.world, {}
    try:
        for kind, nbytes in _jobs(args.sizes):
            n = max(world, nbytes // 4)
            t, m = torch.ones(n), n // world
            gathered, part = torch.empty(m * world), torch.ones(m)
            calls: dict[str, Callable[[], object]] = {
                "broadcast": lambda t=t: dist.broadcast(t, 0),
                "all_gather": lambda g=gathered, p=part: dist.all_gather_into_tensor(g, p),
                "reduce_scatter": lambda t=t, p=part, m=m: dist.reduce_scatter_tensor(
                    p, t[: m * world]
                ),
                "barrier": dist.barrier,
            }
            out[f"{kind}:{nbytes}"] = _time_series(
                calls[kind], dist.barrier, args.warmup, args.iters
            )
    finally:
        dist.destroy_process_group()
    return {"rank": args.rank, "torch": torch.__version__, "times": out}


def collnet_worker(args: argparse.Namespace) -> dict[str, Any]:
    import collnet_client

    comm = collnet_client.connect(args.init, timeout_s=300)
    try:
        comm.update_topology()
        world, out = comm.size, {}
        for kind, nbytes in _jobs(args.sizes):
            n = max(world, nbytes // 4)
            t = comm.empty(n, np.float32)  # in shared memory: no staging copies
            t.fill(1.0)
            m = n // world
            gathered, part = comm.empty(m * world, np.float32), comm.empty(m, np.float32)
            calls: dict[str, Callable[[], object]] = {
                "broadcast": lambda t=t: comm.broadcast(t, 0),
                "all_gather": lambda g=gathered, m=m: comm.all_gather(
                    g[comm.rank * m : (comm.rank + 1) * m], out=g
                ),
                "reduce_scatter": lambda t=t, p=part, m=m: comm.reduce_scatter(
                    t[: m * world], out=p
                ),
                "barrier": comm.barrier,
            }
            out[f"{kind}:{nbytes}"] = _time_series(
                calls[kind], comm.barrier, args.warmup, args.iters
            )
        return {"rank": comm.rank, "times": out}
    finally:
        comm.close()


# ------------------------------------------------------------------ driver


def _run_ranks(argvs: list[list[str]]) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for a in argvs
    ]
    return json_results(procs, 1200, "worker")


def json_results(
    procs: list[subprocess.Popen[bytes]], timeout_s: float, what: str
) -> list[dict[str, Any]]:
    """The JSON object each of ``procs`` prints last, in order. A process that fails
    raises with its stderr's tail; any still running then is killed."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise RuntimeError(f"{what} failed ({p.returncode}):\n{err.decode()[-3000:]}")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _worker_args(args: argparse.Namespace, kind: str, rank: int, init: str) -> list[str]:
    return [
        *("--worker", kind, "--rank", str(rank), "--world", str(args.peers), "--init", init),
        *("--sizes", ",".join(map(str, args.sizes))),
        *("--iters", str(args.iters), "--warmup", str(args.warmup)),
    ]


def _slowest(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    keys = results[0]["times"].keys()
    return {
        k: [max(ts) for ts in zip(*(r["times"][k] for r in results), strict=True)] for k in keys
    }


def run_gloo(args: argparse.Namespace) -> dict[str, list[float]]:
    from allreduce import free_port  # bench/ is this script's directory

    init = f"tcp://127.0.0.1:{free_port()}"
    return _slowest(_run_ranks([_worker_args(args, "gloo", r, init) for r in range(args.peers)]))


def run_collnet(args: argparse.Namespace) -> dict[str, list[float]]:
    from collnet_lab.localcluster import LocalCluster

    cluster = LocalCluster(peers=args.peers, connections=args.connections)
    cluster.start()
    try:
        argvs = [_worker_args(args, "collnet", r, d.ipc) for r, d in enumerate(cluster.daemons)]
        return _slowest(_run_ranks(argvs))
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--sizes", default="4KiB,1MiB,16MiB", help="comma-separated, e.g. 4KiB,1MiB")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="collnet/gloo rounds, ABBA order")
    ap.add_argument("--connections", type=int, default=4, help="collnet TCP connections per peer")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--worker", choices=["gloo", "collnet"], help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sizes = [parse_size(s) for s in str(args.sizes).split(",")]
    if args.worker is not None:
        worker = gloo_worker if args.worker == "gloo" else collnet_worker
        print(json.dumps(worker(args)))
        return 0
    samples: dict[str, dict[str, list[float]]] = {"collnet": {}, "gloo": {}}
    for rnd in range(args.rounds):  # ABBA: neither side always runs on a warmer machine
        order = ("collnet", "gloo") if rnd % 2 == 0 else ("gloo", "collnet")
        for side in order:
            got = run_collnet(args) if side == "collnet" else run_gloo(args)
            for k, ts in got.items():
                samples[side].setdefault(k, []).extend(ts)
    rows: list[dict[str, Any]] = []
    for key in samples["collnet"]:
        kind, nbytes = key.split(":")
        c, g = (statistics.median(samples[s][key]) for s in ("collnet", "gloo"))
        rows.append(
            {
                "collective": kind,
                "bytes": int(nbytes),
                "collnet_median_s": c,
                "gloo_median_s": g,
                "ratio": c / g,
                "samples": len(samples["collnet"][key]),
            }
        )
    result = {"peers": args.peers, "iters": args.iters, "rounds": args.rounds, "rows": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'collective':<16}{'bytes':>10}{'collnet ms':>12}{'gloo ms':>10}{'ratio':>8}")
        for r in rows:
            print(
                f"{r['collective']:<16}{r['bytes']:>10}{r['collnet_median_s'] * 1e3:>12.3f}"
                f"{r['gloo_median_s'] * 1e3:>10.3f}{r['ratio']:>8.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
