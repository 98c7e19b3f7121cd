"""collnet all-reduce against torch.distributed gloo, in the same run.

What is measured
----------------
* **collnet**: a ``LocalCluster`` (one coordinator and ``--peers`` daemon
  processes on 127.0.0.1, ``--connections`` TCP connections per neighbour)
  and one trainer process per peer (``collnet_lab.worker``, the demo's
  worker, launched like ``collnet_lab.up.run_workers`` does but failing
  fast with every rank's stderr; results go through ``up.summarize``). Each worker
  all-reduces (sum) a float32 tensor of ``--size`` bytes once per codec in
  ``--codecs``; every timed call is preceded by a tiny star all-reduce that
  acts as a barrier, and the input copy happens before it. Small-tensor
  latency rows use the same worker at each of ``--latency-sizes`` (codec
  ``none``, ``--algo``), ``--latency-iters`` timed calls.
* **gloo**: ``--peers`` processes (``bench/gloo_worker.py``) joined with
  ``init_process_group("gloo", init_method="tcp://127.0.0.1:<free port>")``,
  the same float32 inputs and sizes, ``barrier()`` then a timed
  ``all_reduce``, the same iteration counts.
* For both, a timed sample is the maximum over ranks of one iteration's
  wall time (the collective is done when its slowest rank is done), and a
  figure is the **median over samples**. The first ``--warmup`` iterations of
  every size/codec are run but dropped (connection set-up, first-touch of
  buffers). busbw = bytes / time * 2(N-1)/N, in GB/s (1e9 bytes per second),
  the nccl-tests convention; for a ring this is what each peer's link carries.
* **raw TCP** (``bench/rawtcp.py``): loopback throughput of 1 and of K plain
  TCP streams between two processes (``sendall`` / ``recv_into``), the same
  total bytes for each K, so readers see what loopback carries here.
* **codec throughput** (``bench/codec_speed.py``): encode and decode GB/s of
  every codec on a 4 MiB float32 array, single thread, median of repeats.

Fairness on a small, shared machine
-----------------------------------
Everything runs on one host, so all peers and the kernel's loopback share
its cores and results are noisy. The run is split into ``--rounds`` rounds
(default 4); each round runs gloo and collnet once, in ABBA order (round 0:
gloo then collnet, round 1: collnet then gloo, ...), so slow drift in machine
load hits both sides alike. Each collnet worker session gets a freshly
started cluster (one per size per round), stopped before anything else runs,
so gloo never competes with idle daemons. Samples of all rounds are pooled
before the median; per-round figures are printed and are in the JSON under
``rounds``, raw samples under ``samples_s``.

Why a fresh cluster per session: a second client session on the same
daemons restarts its tag counter, and the daemons remember the first
session's ``(epoch, tag)`` keys as finished, so the second session's early
data is dropped and its all-reduce hangs until the collective timeout.

Usage::

    python bench/allreduce.py --peers 4 --size 64MiB
    python bench/allreduce.py --peers 4 --size 64MiB --json

Without an importable torch (or without gloo support) the gloo part is
skipped with a message, and the JSON reports ``gloo_busbw: null`` and
``ratio: null``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import codec_speed
import numpy as np
import rawtcp
from collectives import json_results
from collnet_lab.localcluster import LocalCluster, parse_size
from collnet_lab.up import summarize

from collnet import __version__ as collnet_version
from collnet.codec.registry import CODEC_NAMES

HERE = Path(__file__).resolve().parent
GLOO_WORKER = HERE / "gloo_worker.py"
EXIT_NO_TORCH = 3

Samples = list[float]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def busbw(nbytes: int, t: float, world: int) -> float:
    return nbytes / t / 1e9 * (2 * (world - 1) / world if world > 1 else 1.0)


def max_over_ranks(per_rank: list[Samples]) -> Samples:
    """Per iteration, the slowest rank's time."""
    return [max(ts) for ts in zip(*per_rank, strict=True)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = ["git", "-C", str(HERE.parent)]
    rev: str | None = None
    try:
        p = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        if p.returncode == 0:
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            rev = p.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        pass
    return {
        "git": rev,
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "collnet": collnet_version,
    }


def gloo_unavailable_reason() -> str | None:
    """None if torch.distributed with gloo imports in a child; else why not."""
    probe = (
        "import sys\n"
        "try:\n"
        "    import torch.distributed as d\n"
        "except Exception as e:\n"
        "    print(f'torch not importable: {e}'); sys.exit(3)\n"
        "if not (d.is_available() and d.is_gloo_available()):\n"
        "    print('torch.distributed has no gloo backend'); sys.exit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if p.returncode == 0:
        return None
    return (p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr) else "unknown"


# --------------------------------------------------------------------- gloo


def run_gloo(
    peers: int, jobs: list[tuple[int, int]], warmup: int, check: bool
) -> tuple[dict[int, dict[str, Any]], str]:
    """One gloo process group run: per size the samples (warm-up excluded) and max error,
    and the torch version."""
    init = f"tcp://127.0.0.1:{free_port()}"
    job_arg = ",".join(f"{nb}:{it}" for nb, it in jobs)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(GLOO_WORKER),
                "--rank",
                str(r),
                "--world",
                str(peers),
                "--init",
                init,
                "--jobs",
                job_arg,
                "--warmup",
                str(warmup),
                *([] if check else ["--no-check"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(peers)
    ]
    results = json_results(procs, 900, "gloo worker")
    per_size: dict[int, dict[str, Any]] = {}
    for nbytes, _ in jobs:
        rows = [r["sizes"][str(nbytes)] for r in results]
        errs = [row["max_abs_error"] for row in rows if row["max_abs_error"] is not None]
        per_size[nbytes] = {
            "samples": max_over_ranks([row["times_s"] for row in rows]),
            "max_abs_error": max(errs) if errs else None,
        }
    return per_size, str(results[0]["torch"])


# ------------------------------------------------------------------ collnet


def run_workers(
    cluster: LocalCluster, nbytes: int, codecs: list[str], iters: int, algo: str, check: bool
) -> list[dict[str, Any]]:
    """Like ``collnet_lab.up.run_workers`` (same worker, same arguments), but fails fast.

    If any rank exits non-zero the others are killed at once (they would
    otherwise sit in ``update_topology`` or a collective until their timeout)
    and the stderr of every rank is reported, not only the first's.
    """
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "collnet_lab.worker",
                *("--ipc", d.ipc, "--rank", str(i), "--world", str(len(cluster.daemons))),
                *("--nbytes", str(nbytes), "--codecs", ",".join(codecs)),
                *("--iters", str(iters), "--algo", algo),
                *([] if check else ["--no-check"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, d in enumerate(cluster.daemons)
    ]
    outs: dict[int, tuple[bytes, bytes]] = {}
    deadline = time.monotonic() + 900
    try:
        failed = False
        while len(outs) < len(procs) and not failed:
            for i, p in enumerate(procs):
                if i not in outs and p.poll() is not None:
                    outs[i] = p.communicate()
                    failed |= p.returncode != 0
            if time.monotonic() > deadline:
                failed = True
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for i, p in enumerate(procs):
            if i not in outs:
                outs[i] = p.communicate()
    if any(p.returncode != 0 for p in procs):
        report = "\n".join(
            f"--- worker rank {i} exit {p.returncode}\n"
            + outs[i][1].decode(errors="replace")[-3000:]
            for i, p in enumerate(procs)
        )
        raise RuntimeError(f"collnet worker(s) failed:\n{report}")
    return [json.loads(outs[i][0].decode().strip().splitlines()[-1]) for i in range(len(procs))]


def _collnet_samples(
    cluster: LocalCluster,
    nbytes: int,
    codecs: list[str],
    iters: int,
    warmup: int,
    algo: str,
    check: bool,
) -> tuple[dict[str, Samples], dict[str, Any]]:
    results = run_workers(cluster, nbytes, codecs, iters + warmup, algo, check)
    for r in results:  # drop the warm-up iterations before anything else sees them
        for c in codecs:
            r["codecs"][c]["times_s"] = r["codecs"][c]["times_s"][warmup:]
    summary = summarize(results, codecs, nbytes)
    samples = {c: max_over_ranks([r["codecs"][c]["times_s"] for r in results]) for c in codecs}
    return samples, summary


def _with_cluster(
    args: argparse.Namespace, nbytes: int, codecs: list[str], iters: int
) -> tuple[dict[str, Samples], dict[str, Any]]:
    # A fresh cluster per worker session keeps the sessions independent.
    cluster = LocalCluster(peers=args.peers, connections=args.connections, keep_workdir=True)
    try:
        cluster.start()
        out = _collnet_samples(cluster, nbytes, codecs, iters, args.warmup, args.algo, args.check)
    except Exception:
        cluster.stop()
        log(f"collnet run failed; daemon logs kept in {cluster.workdir}:\n{cluster.logs()}")
        raise
    cluster.stop()
    shutil.rmtree(cluster.dir, ignore_errors=True)  # kept only when something failed
    return out


def run_collnet(
    args: argparse.Namespace, nbytes: int, codecs: list[str], lat_sizes: list[int]
) -> dict[str, Any]:
    big, summary = _with_cluster(args, nbytes, codecs, args.iters)
    lat = {nb: _with_cluster(args, nb, ["none"], args.latency_iters)[0]["none"] for nb in lat_sizes}
    return {"big": big, "summary": summary, "latency": lat}


# -------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="collnet all-reduce vs torch.distributed gloo (and raw TCP) on loopback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--size", default="64MiB", help="float32 tensor size for the bandwidth rows")
    ap.add_argument("--connections", type=int, default=4, help="collnet TCP connections per peer")
    ap.add_argument("--codecs", default=",".join(CODEC_NAMES))
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per round (bandwidth)")
    ap.add_argument("--latency-sizes", default="1MiB,4KiB")
    ap.add_argument("--latency-iters", type=int, default=20, help="timed iterations per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations before each series")
    ap.add_argument("--rounds", type=int, default=4, help="gloo/collnet rounds, ABBA order")
    ap.add_argument("--algo", default="auto", choices=["auto", "ring", "star", "direct"])
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip numpy reference")
    ap.add_argument("--no-gloo", action="store_true", help="skip the gloo baseline")
    ap.add_argument("--no-tcp", action="store_true", help="skip the raw TCP baseline")
    ap.add_argument("--tcp-bytes", default="256MiB", help="total bytes per raw TCP measurement")
    ap.add_argument("--tcp-repeats", type=int, default=3)
    ap.add_argument("--codec-size", default="4MiB")
    ap.add_argument("--codec-repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    if args.peers < 2:
        ap.error("--peers must be at least 2")
    if args.iters < 1 or args.latency_iters < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--iters, --latency-iters and --rounds must be >= 1, --warmup >= 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = parse_size(args.size)
    codecs = args.codecs.split(",")
    if "none" not in codecs:
        codecs.insert(0, "none")
    lat_labels = args.latency_sizes.split(",") if args.latency_sizes else []
    lat_sizes = [parse_size(s) for s in lat_labels]
    world = args.peers

    gloo_reason = "disabled with --no-gloo" if args.no_gloo else gloo_unavailable_reason()
    if gloo_reason is not None:
        log(f"gloo baseline skipped: {gloo_reason}")
    gloo_jobs = [(nbytes, args.iters), *((nb, args.latency_iters) for nb in lat_sizes)]

    col_big: dict[str, Samples] = {c: [] for c in codecs}
    col_lat: dict[int, Samples] = {nb: [] for nb in lat_sizes}
    gloo_big: Samples = []
    gloo_lat: dict[int, Samples] = {nb: [] for nb in lat_sizes}
    gloo_err: float | None = None
    torch_version: str | None = None
    rounds: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []

    for rnd in range(args.rounds):
        order = ["gloo", "collnet"] if rnd % 2 == 0 else ["collnet", "gloo"]
        info: dict[str, Any] = {"order": order}
        for side in order:
            if side == "gloo":
                if gloo_reason is not None:
                    continue
                log(f"round {rnd}: gloo")
                g, torch_version = run_gloo(world, gloo_jobs, args.warmup, args.check)
                gloo_big += g[nbytes]["samples"]
                if g[nbytes]["max_abs_error"] is not None:
                    gloo_err = max(gloo_err or 0.0, g[nbytes]["max_abs_error"])
                for nb in lat_sizes:
                    gloo_lat[nb] += g[nb]["samples"]
                info["gloo_busbw"] = busbw(nbytes, statistics.median(g[nbytes]["samples"]), world)
            else:
                log(f"round {rnd}: collnet")
                c = run_collnet(args, nbytes, codecs, lat_sizes)
                summaries.append(c["summary"])
                for k in codecs:
                    col_big[k] += c["big"][k]
                for nb in lat_sizes:
                    col_lat[nb] += c["latency"][nb]
                info["collnet_busbw"] = busbw(nbytes, statistics.median(c["big"]["none"]), world)
                info["collnet_codecs_busbw"] = {
                    k: busbw(nbytes, statistics.median(v), world) for k, v in c["big"].items()
                }
        if "gloo_busbw" in info:
            info["ratio"] = info["collnet_busbw"] / info["gloo_busbw"]
        rounds.append(info)

    col_t = statistics.median(col_big["none"])
    col_bw = busbw(nbytes, col_t, world)
    gloo_t = statistics.median(gloo_big) if gloo_big else None
    gloo_bw = busbw(nbytes, gloo_t, world) if gloo_t else None
    codec_rows: dict[str, Any] = {}
    for k in codecs:
        t = statistics.median(col_big[k])
        bw = busbw(nbytes, t, world)
        codec_rows[k] = {
            "time_s": t,
            "busbw": bw,
            "ratio_vs_none": bw / col_bw,
            "max_abs_error": max(
                (s["codecs"][k]["max_abs_error"] for s in summaries), key=lambda e: e or 0.0
            ),
            "bit_identical": all(s["codecs"][k]["bit_identical"] for s in summaries),
            "ok": all(s["codecs"][k]["ok"] for s in summaries),
        }

    out: dict[str, Any] = {
        "collnet_busbw": col_bw,
        "gloo_busbw": gloo_bw,
        "ratio": col_bw / gloo_bw if gloo_bw else None,
        "collnet_time_s": col_t,
        "gloo_time_s": gloo_t,
        "gloo_max_abs_error": gloo_err,
        "gloo_skipped": gloo_reason,
        "codecs": codec_rows,
        "samples_s": {"collnet": col_big["none"], "gloo": gloo_big},
    }
    for label, nb in zip(lat_labels, lat_sizes, strict=True):
        ct = statistics.median(col_lat[nb])
        gt = statistics.median(gloo_lat[nb]) if gloo_lat[nb] else None
        out[f"latency_{label}_s"] = {
            "bytes": nb,
            "collnet": ct,
            "gloo": gt,
            "ratio": ct / gt if gt else None,
            "samples_s": {"collnet": col_lat[nb], "gloo": gloo_lat[nb]},
        }

    if not args.no_tcp:
        log("raw TCP")
        streams = sorted({1, args.connections})
        out["raw_tcp"] = rawtcp.measure(streams, parse_size(args.tcp_bytes), args.tcp_repeats)
    log("codec throughput")
    out["codec_throughput"] = codec_speed.measure(
        codecs, parse_size(args.codec_size), args.codec_repeats
    )
    out["rounds"] = rounds
    out["ok"] = all(r["ok"] for r in codec_rows.values())
    out["settings"] = {
        "peers": world,
        "bytes": nbytes,
        "size": args.size,
        "dtype": "float32",
        "connections": args.connections,
        "codecs": codecs,
        "algo": args.algo,
        "iters": args.iters,
        "latency_iters": args.latency_iters,
        "latency_sizes": lat_labels,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "order": "ABBA: even rounds gloo then collnet, odd rounds collnet then gloo",
        "statistic": "median over iterations (pooled over rounds) of the max over ranks",
        "busbw": "bytes / time * 2(N-1)/N / 1e9",
        "samples_per_figure": {
            "bandwidth": args.iters * args.rounds,
            "latency": args.latency_iters * args.rounds,
        },
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    out["machine"] = {**machine_info(), "torch": torch_version}
    out["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return out


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def print_report(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(
        f"all-reduce, {s['peers']} peers on loopback, {s['bytes'] / 2**20:g} MiB float32, "
        f"collnet {s['connections']} conn/peer algo {s['algo']}; "
        f"{s['rounds']} rounds (ABBA) x {s['iters']} timed iters after {s['warmup']} warm-up; "
        "median of per-iteration max over ranks"
    )
    if r["gloo_skipped"]:
        print(f"gloo baseline skipped: {r['gloo_skipped']}")
    print()
    print(f"{'':<16} {'time ms':>9} {'busbw GB/s':>11}")
    gt = r["gloo_time_s"]
    print(f"{'gloo':<16} {_f(gt and gt * 1e3, '9.1f'):>9} {_f(r['gloo_busbw'], '11.3f'):>11}")
    print(f"{'collnet (none)':<16} {r['collnet_time_s'] * 1e3:>9.1f} {r['collnet_busbw']:>11.3f}")
    print(f"ratio collnet/gloo (busbw): {_f(r['ratio'], '.2f')}")
    per_round = "  ".join(
        f"{i}: {_f(x.get('collnet_busbw'), '.3f')}/{_f(x.get('gloo_busbw'), '.3f')}"
        f"={_f(x.get('ratio'), '.2f')}"
        for i, x in enumerate(r["rounds"])
    )
    print(f"per round, collnet/gloo busbw GB/s: {per_round}")
    print()
    print("collnet per codec")
    print(
        f"{'codec':<8} {'time ms':>9} {'busbw GB/s':>11} {'vs none':>8} "
        f"{'max error':>10} {'bit-identical':>14}"
    )
    for k, row in r["codecs"].items():
        err = _f(row["max_abs_error"], ".2e")
        print(
            f"{k:<8} {row['time_s'] * 1e3:>9.1f} {row['busbw']:>11.3f} "
            f"{row['ratio_vs_none']:>8.2f} {err:>10} {'yes' if row['bit_identical'] else 'NO':>14}"
        )
    print()
    lat = [(k, v) for k, v in r.items() if k.startswith("latency_")]
    if lat:
        print(
            f"latency (codec none, algo {s['algo']}, median of "
            f"{s['rounds']} x {s['latency_iters']} iters)"
        )
        print(f"{'size':<8} {'collnet ms':>11} {'gloo ms':>9} {'collnet/gloo':>13}")
        for k, v in lat:
            g = v["gloo"]
            print(
                f"{k[len('latency_') : -2]:<8} {v['collnet'] * 1e3:>11.3f} "
                f"{_f(g and g * 1e3, '9.3f'):>9} {_f(v['ratio'], '13.2f'):>13}"
            )
        print()
    if "raw_tcp" in r:
        t = r["raw_tcp"]
        print(
            f"raw TCP loopback, 2 processes, {t['bytes'] / 2**20:g} MiB per measurement "
            f"(median of {t['repeats']})"
        )
        for k, row in t["streams"].items():
            print(f"  {k:>2} stream(s): {row['gbps']:7.3f} GB/s")
        print()
    ct = r["codec_throughput"]
    print(
        f"codec throughput, {ct['bytes'] / 2**20:g} MiB float32, single thread "
        f"(GB/s of float32 input, median of {ct['repeats']})"
    )
    print(f"{'codec':<8} {'encode':>8} {'decode':>8} {'size ratio':>11}")
    for k, row in ct["codecs"].items():
        print(
            f"{k:<8} {row['encode_gbps']:>8.2f} {row['decode_gbps']:>8.2f} "
            f"{ct['bytes'] / row['encoded_bytes']:>11.2f}"
        )
    print()
    print("result:", "OK" if r["ok"] else "FAILED (error bound or bit-identity)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
