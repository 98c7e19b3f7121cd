"""A trainer stand-in for the demo and the benchmarks: one process per peer.

It connects to its daemon through ``collnet_client``, waits for the world to
reach its expected size, and for each codec all-reduces a deterministic
random tensor ``iters`` times. Each timed call is preceded by a tiny
all-reduce that acts as a barrier, so the timing covers the collective, not
the peers' skew. It prints one JSON line: per codec the times, the max error
against a float64 numpy reference, and the xxhash of the result (equal hashes
across peers = bit-identical results).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import collnet_client
import numpy as np
import xxhash


def peer_input(rank: int, n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(1000 + rank).uniform(-1.0, 1.0, n).astype(np.float32)


def reference_sum(world: int, n: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    ref = np.zeros(n, dtype=np.float64)
    for r in range(world):
        ref += peer_input(r, n)
    return ref


def wait_for_world(comm: collnet_client.Comm, world: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while comm.update_topology().size < world:
        if time.monotonic() > deadline:
            raise collnet_client.Timeout(f"world did not reach {world} peers")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ipc", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--nbytes", type=int, required=True)
    ap.add_argument("--codecs", default="none")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--algo", default="auto")
    ap.add_argument("--no-check", action="store_true", help="Skip the numpy reference.")
    args = ap.parse_args(argv)

    n = max(1, args.nbytes // 4)
    with collnet_client.connect(args.ipc) as comm:
        wait_for_world(comm, args.world)
        data = peer_input(args.rank, n)
        ref = None if args.no_check else reference_sum(args.world, n)
        buf = comm.empty(n, np.float32)
        flag = comm.zeros(1, np.float32)
        out: dict[str, Any] = {"rank": args.rank, "peer": comm.peer_id, "n": n, "codecs": {}}
        for codec in args.codecs.split(","):
            times = []
            for _ in range(args.iters):
                np.copyto(buf, data)
                comm.all_reduce(flag, algo="star")
                t0 = time.perf_counter()
                comm.all_reduce(buf, op="sum", codec=codec, algo=args.algo)
                times.append(time.perf_counter() - t0)
            err = float(np.max(np.abs(buf - ref))) if ref is not None else None
            out["codecs"][codec] = {
                "times_s": times,
                "max_abs_error": err,
                "hash": xxhash.xxh64_hexdigest(buf.tobytes()),
            }
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
