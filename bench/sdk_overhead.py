"""What the client SDK adds to an all-reduce: SDK call vs the same all-reduce inside the daemons.

What is measured
----------------
A ``LocalCluster`` (a coordinator and ``--peers`` daemons on 127.0.0.1) and
one trainer process per daemon (this script with ``--worker``). Every trainer
runs, in ``--rounds`` rounds alternating ABBA, two series of ``--iters``
all-reduces (op avg, float32, ``--size`` bytes, codec ``--codec``):

* **daemon**: one ``comm.bench_all_reduce`` call (the ``bench_all_reduce``
  IPC request); the daemon allocates the buffer itself and runs the
  iterations through ``AllReduces.run`` (the same path a trainer's request
  takes), timing each inside the daemon: no IPC, no client;
* **sdk**: ``comm.all_reduce`` on an array from ``comm.empty`` (shared
  memory, zero copy), timed in the trainer around the call: request over
  pyzmq, the daemon's work, the reply;
* **sdk-staged** (unless ``--no-staged``): the same on a plain numpy array,
  which the SDK copies into staging and back (one copy each way).

Both series put a one-element star all-reduce before every timed iteration
(inside the daemon, or through the SDK), so a time covers one collective,
not the peers' skew. A sample is the maximum over ranks of one iteration;
the first ``--warmup`` iterations of every series are dropped; a figure is
the median over the pooled samples. The ratio is sdk / daemon (1.0 = the SDK
costs nothing; the bar is at most 1.15).

Usage::

    python bench/sdk_overhead.py --peers 4 --size 64MiB
    python bench/sdk_overhead.py --peers 4 --size 64MiB --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

Samples = list[float]
SERIES = ("daemon", "sdk", "sdk-staged")


def log(msg: str) -> None:
    print(f"[sdk-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> int:
    import collnet_client

    n = args.nbytes // 4
    with collnet_client.connect(args.ipc, timeout_s=600) as comm:
        deadline = time.monotonic() + 60
        while comm.update_topology().size < args.world:
            if time.monotonic() > deadline:
                raise collnet_client.Timeout(f"world did not reach {args.world} peers")
            time.sleep(0.05)
        shared = comm.empty(n, np.float32)
        plain = np.empty(n, np.float32)
        flag = comm.zeros(1, np.float32)
        out: dict[str, list[Samples]] = {s: [] for s in args.series}

        def via_sdk(buf: np.ndarray, tag: str) -> Samples:
            buf.fill(1.0)
            times = []
            for i in range(args.iters):
                comm.all_reduce(flag, algo="star", tag=f"{tag}-b{i}")
                started = time.perf_counter()
                comm.all_reduce(buf, op="avg", codec=args.codec, tag=f"{tag}-{i}")
                times.append(time.perf_counter() - started)
            return times

        for rnd in range(args.rounds):
            order = list(args.series) if rnd % 2 == 0 else list(reversed(args.series))
            for series in order:
                tag = f"{series}-{rnd}"
                if series == "daemon":
                    times = comm.bench_all_reduce(
                        n, tag=tag, iters=args.iters, op="avg", codec=args.codec, barrier=True
                    )
                else:
                    times = via_sdk(shared if series == "sdk" else plain, tag)
                out[series].append(times)
        print(json.dumps({"rank": args.rank, "series": out}), flush=True)
    return 0


# ----------------------------------------------------------------- launcher


def run(args: argparse.Namespace) -> dict[str, Any]:
    from collnet_lab.localcluster import LocalCluster, parse_size

    nbytes = parse_size(args.size)
    series = [s for s in SERIES if s != "sdk-staged" or not args.no_staged]
    cluster = LocalCluster(peers=args.peers, connections=args.connections)
    try:
        cluster.start()
        log(f"{args.peers} daemons up; {len(series)} series x {args.rounds} rounds")
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        argv += ["--world", str(args.peers), "--nbytes", str(nbytes), "--codec", args.codec]
        argv += ["--iters", str(args.iters + args.warmup), "--rounds", str(args.rounds)]
        argv += ["--series", ",".join(series)]
        procs = [
            subprocess.Popen(
                [*argv, "--ipc", d.ipc, "--rank", str(i)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for i, d in enumerate(cluster.daemons)
        ]
        results = []
        for i, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=args.timeout_s)
            if p.returncode != 0:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
                raise RuntimeError(f"worker {i} exited {p.returncode}:\n{stderr.decode()[-3000:]}")
            results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    finally:
        cluster.stop()
    figures: dict[str, Any] = {}
    for s in series:
        pooled: Samples = []
        per_round = []
        for rnd in range(args.rounds):
            per_rank = [r["series"][s][rnd][args.warmup :] for r in results]
            samples = [max(ts) for ts in zip(*per_rank, strict=True)]
            pooled += samples
            per_round.append(statistics.median(samples))
        figures[s] = {"median_s": statistics.median(pooled), "rounds_s": per_round}
        figures[s]["samples_s"] = pooled
    base = figures["daemon"]["median_s"]
    out = {
        "peers": args.peers,
        "size_bytes": nbytes,
        "codec": args.codec,
        "iters": args.iters,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "series": figures,
        "ratio": figures["sdk"]["median_s"] / base,
        "ratio_staged": figures["sdk-staged"]["median_s"] / base
        if "sdk-staged" in figures
        else None,
        "bar": 1.15,
    }
    out["ok"] = out["ratio"] <= out["bar"]
    return out


def print_table(out: dict[str, Any]) -> None:
    mib = out["size_bytes"] / (1 << 20)
    print(
        f"SDK overhead: {out['peers']} peers, {mib:.1f} MiB float32 avg, codec {out['codec']}; "
        f"{out['rounds']} rounds (ABBA) x {out['iters']} timed iters; median of max over ranks"
    )
    print(f"{'series':12} {'time ms':>9}  per round ms")
    for name, fig in out["series"].items():
        rounds = " ".join(f"{t * 1e3:7.1f}" for t in fig["rounds_s"])
        print(f"{name:12} {fig['median_s'] * 1e3:9.1f}  {rounds}")
    print(f"ratio sdk/daemon: {out['ratio']:.3f} (bar {out['bar']})")
    if out["ratio_staged"] is not None:
        print(
            "ratio sdk-staged/daemon (plain numpy array, copied in and out): "
            f"{out['ratio_staged']:.3f}"
        )
    print(f"result: {'OK' if out['ok'] else 'ABOVE BAR'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="all-reduce through the SDK vs inside the daemons",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per series and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-staged", action="store_true", help="skip the plain-numpy series")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--json", action="store_true")
    # worker mode (started by the launcher)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ipc", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--nbytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--series", default=",".join(SERIES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.series = args.series.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
