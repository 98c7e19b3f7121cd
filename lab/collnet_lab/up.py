"""``collnet up``: a local cluster doing real all-reduces, checked against numpy."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from collnet_lab.localcluster import LocalCluster

# Sanity bounds on |result - float64 reference| for inputs uniform in [-1, 1):
# partial sums reach at most `world`, each of ~world quantization hops adds at
# most half a quantization step of a block whose range is at most 2*world.
_LEVELS = {"none": None, "fp16": 2**11, "bf16": 2**8, "uint8": 255, "uint4": 15}


def error_bound(codec: str, world: int) -> float:
    levels = _LEVELS.get(codec.split("+")[0])
    if levels is None:
        return 1e-5 * world
    if codec.startswith(("fp16", "bf16")):
        return world * world / levels
    return world * world / levels


def run_workers(
    cluster: LocalCluster,
    nbytes: int,
    codecs: list[str],
    iters: int,
    algo: str,
    check: bool = True,
    timeout_s: float = 900.0,
) -> list[dict[str, Any]]:
    """One worker process per daemon; their JSON results, in rank order.

    The first worker to fail stops the others at once (they would wait for it
    until their collective deadline), and every worker's stderr is reported.
    """
    world = len(cluster.daemons)
    outs = [cluster.dir / f"worker{i}.out" for i in range(world)]
    errs = [cluster.dir / f"worker{i}.err" for i in range(world)]
    procs = []
    for i, d in enumerate(cluster.daemons):
        with outs[i].open("wb") as out, errs[i].open("wb") as err:
            args = ["--ipc", d.ipc, "--rank", str(i), "--world", str(world)]
            args += ["--nbytes", str(nbytes), "--codecs", ",".join(codecs)]
            args += ["--iters", str(iters), "--algo", algo, *([] if check else ["--no-check"])]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "collnet_lab.worker", *args],
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                )
            )
    deadline = time.monotonic() + timeout_s
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = -1
        time.sleep(0.05)
    failed = (
        failed
        if failed is not None
        else next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    )
    if failed is not None:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        report = "\n".join(
            f"--- worker {i} (exit {p.returncode}):\n{errs[i].read_text(errors='replace')[-2000:]}"
            for i, p in enumerate(procs)
        )
        what = "timed out" if failed == -1 else f"worker {failed} failed"
        raise RuntimeError(f"{what}\n{report}\n{cluster.logs()}")
    return [json.loads(o.read_text().strip().splitlines()[-1]) for o in outs]


def summarize(results: list[dict[str, Any]], codecs: list[str], nbytes: int) -> dict[str, Any]:
    world = len(results)
    summary: dict[str, Any] = {"peers": world, "bytes": nbytes, "codecs": {}}
    all_ok = True
    all_identical = True
    for codec in codecs:
        per_iter = zip(*(r["codecs"][codec]["times_s"] for r in results), strict=True)
        t = statistics.median(max(ts) for ts in per_iter)
        algbw = nbytes / t / 1e9
        busbw = algbw * (2 * (world - 1) / world if world > 1 else 1.0)
        errs = [r["codecs"][codec]["max_abs_error"] for r in results]
        err = max(e for e in errs if e is not None) if errs[0] is not None else None
        identical = len({r["codecs"][codec]["hash"] for r in results}) == 1
        bound = error_bound(codec, world)
        ok = identical and (err is None or err <= bound)
        all_ok &= ok
        all_identical &= identical
        summary["codecs"][codec] = {
            "time_s": t,
            "algbw": algbw,
            "busbw": busbw,
            "max_abs_error": err,
            "error_bound": bound,
            "bit_identical": identical,
            "ok": ok,
        }
    summary["ok"] = all_ok
    summary["bit_identical"] = all_identical
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"collnet all-reduce: {summary['peers']} peers, "
        f"{summary['bytes'] / 2**20:.1f} MiB float32, loopback"
    )
    print(
        f"{'codec':<8} {'time ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11} "
        f"{'max error':>10} {'bit-identical':>14}"
    )
    for codec, row in summary["codecs"].items():
        err = "n/a" if row["max_abs_error"] is None else f"{row['max_abs_error']:.2e}"
        print(
            f"{codec:<8} {row['time_s'] * 1e3:>9.1f} {row['algbw']:>11.3f} "
            f"{row['busbw']:>11.3f} {err:>10} {'yes' if row['bit_identical'] else 'NO':>14}"
        )
    print("result:", "OK" if summary["ok"] else "FAILED")


def run_demo(
    peers: int,
    nbytes: int,
    codecs: list[str],
    iters: int,
    connections: int,
    algo: str,
    as_json: bool,
) -> bool:
    with LocalCluster(peers=peers, connections=connections) as cluster:
        results = run_workers(cluster, nbytes, codecs, iters, algo)
    summary = summarize(results, codecs, nbytes)
    if as_json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return bool(summary["ok"])
