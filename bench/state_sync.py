"""How fast a joiner gets the shared state, against raw TCP on the same machine.

A local cluster of ``--holders`` daemons holds ``--size`` bytes of state (in
16 MiB float32 tensors, in shared memory); a new daemon joins, is admitted,
and every member calls ``sync_state``. The joiner's call is timed from the
moment it is issued until it returns (hashing, both barriers, the striped
fetch and verification included). The baseline is ``bench/rawtcp.py``: the
same number of bytes pushed through plain TCP streams between two processes
on loopback. Each side is repeated and the median reported; the ratio is
collnet's GB/s over raw TCP's.

    python bench/state_sync.py --holders 4 --size 256MiB --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import collnet_client
import numpy as np
from collnet_client import Comm
from collnet_lab.localcluster import LocalCluster, parse_size

sys.path.insert(0, str(Path(__file__).parent))
import rawtcp

TENSOR_BYTES = 16 << 20


def _state(comm: Comm, nbytes: int, fresh: bool) -> dict[str, np.ndarray]:
    state = {}
    n = TENSOR_BYTES // 4
    for i in range(max(1, nbytes // TENSOR_BYTES)):
        arr = comm.empty(n, np.float32)
        arr[:] = 0 if fresh else np.arange(n, dtype=np.float32) + i
        state[f"t{i}"] = arr
    return state


def _sync_all(comms: list[Comm], states: list[dict[str, np.ndarray]], revs: list[int]) -> list[Any]:
    out: list[Any] = [None] * len(comms)

    def one(i: int) -> None:
        out[i] = comms[i].sync_state(states[i], revs[i], timeout_s=300.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(comms) - 1)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    one(len(comms) - 1)  # the joiner, timed
    took = time.perf_counter() - started
    for t in threads:
        t.join()
    out.append(took)
    return out


def _update_all(comms: list[Comm]) -> None:
    threads = [threading.Thread(target=c.update_topology) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure_once(holders: int, nbytes: int, connections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="collnet-bench-") as tmp:
        cluster = LocalCluster(peers=holders, connections=connections, workdir=Path(tmp))
        cluster.start()
        comms: list[Comm] = []
        try:
            comms = [collnet_client.connect(d.ipc, timeout_s=300.0) for d in cluster.daemons]
            _update_all(comms)
            states = [_state(c, nbytes, fresh=False) for c in comms]
            cluster.add_daemon()
            comms.append(collnet_client.connect(cluster.daemons[-1].ipc, timeout_s=300.0))
            _update_all(comms)
            states.append(_state(comms[-1], nbytes, fresh=True))
            *results, took = _sync_all(comms, states, [1] * holders + [0])
            joiner = results[-1]
            assert joiner.in_parity and joiner.bytes_fetched > 0, joiner
            return {"seconds": took, "bytes": joiner.bytes_fetched, "sources": len(joiner.sources)}
        finally:
            for c in comms:
                c.close()
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--holders", type=int, default=4)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    nbytes = parse_size(args.size)
    runs = [measure_once(args.holders, nbytes, args.connections) for _ in range(args.repeats)]
    seconds = statistics.median(r["seconds"] for r in runs)
    moved = runs[0]["bytes"]
    collnet_gbps = moved / seconds / 1e9
    raw = rawtcp.measure([args.connections], moved, args.repeats)
    raw_gbps = float(raw["streams"][str(args.connections)]["gbps"])
    report = {
        "holders": args.holders,
        "bytes": moved,
        "sources": runs[0]["sources"],
        "joiner_sync_s": round(seconds, 3),
        "collnet_gbps": round(collnet_gbps, 3),
        "rawtcp_gbps": round(raw_gbps, 3),
        "ratio": round(collnet_gbps / raw_gbps, 3),
        "runs_s": [round(r["seconds"], 3) for r in runs],
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"joiner fetched {moved / 2**20:.0f} MiB from {report['sources']} holders in "
            f"{seconds:.3f} s (median of {args.repeats}): {collnet_gbps:.3f} GB/s; raw TCP "
            f"({args.connections} streams, same bytes) {raw_gbps:.3f} GB/s; ratio {report['ratio']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
