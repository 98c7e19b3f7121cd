"""One rank of the torch.distributed gloo baseline (started by ``allreduce.py``).

Mirrors ``collnet_lab.worker``: the same deterministic float32 inputs
(``peer_input``), for each requested size ``warmup`` untimed all-reduces and
then ``iters`` timed ones, each preceded by a ``barrier()`` so the timing
covers the collective and not the ranks' skew; the copy of the input into the
tensor happens before the barrier and is not timed. Prints one JSON line:
per size the times and the max error against a float64 numpy reference.

Exits with status 3 if torch.distributed / gloo cannot be imported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

import numpy as np
from collnet_lab.worker import peer_input, reference_sum

EXIT_NO_TORCH = 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True, help="init_method, e.g. tcp://127.0.0.1:29500")
    ap.add_argument(
        "--jobs",
        required=True,
        help="Comma-separated NBYTES:ITERS pairs, run in order, e.g. 67108864:5,4096:20",
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-check", action="store_true", help="Skip the numpy reference.")
    args = ap.parse_args(argv)

    try:
        import torch
        import torch.distributed as dist
    except Exception as e:  # ImportError, or a broken install raising something else
        print(f"torch not importable: {e}", file=sys.stderr)
        return EXIT_NO_TORCH
    if not (dist.is_available() and dist.is_gloo_available()):
        print("torch.distributed with gloo is not available", file=sys.stderr)
        return EXIT_NO_TORCH

    dist.init_process_group(
        "gloo",
        init_method=args.init,
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        out: dict[str, Any] = {"rank": args.rank, "torch": torch.__version__, "sizes": {}}
        for job in args.jobs.split(","):
            nbytes_s, iters_s = job.split(":")
            nbytes, iters = int(nbytes_s), int(iters_s)
            n = max(1, nbytes // 4)
            data = torch.from_numpy(peer_input(args.rank, n))
            t = torch.empty_like(data)
            for _ in range(args.warmup):
                t.copy_(data)
                dist.barrier()
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            times = []
            for _ in range(iters):
                t.copy_(data)
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                times.append(time.perf_counter() - t0)
            err = None
            if not args.no_check:
                ref = reference_sum(args.world, n)
                err = float(np.max(np.abs(t.numpy().astype(np.float64) - ref)))
            out["sizes"][str(nbytes)] = {"times_s": times, "max_abs_error": err}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
