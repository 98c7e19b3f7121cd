"""uint8/uint4 codec throughput, C accelerator vs numpy path (single thread).

For each codec, chunk size and path: best-of-``repeats`` timeit of
``encode(x)``, ``decode(data, n, out=buf)`` and ``decode_add(data, acc,
scratch)`` on float32 input uniform in [-1, 1), reported as GB/s of float32
(4 * n bytes / seconds / 1e9)::

    python bench/minmax_speed.py --sizes 1,4 --repeats 7
"""

from __future__ import annotations

import argparse
import functools
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from collnet.codec.minmax import ACCELERATOR_AVAILABLE, Uint4Codec, Uint8Codec


def best(fn: Callable[[], Any], number: int, repeats: int) -> float:
    """Seconds per call: the best of ``repeats`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4", help="chunk sizes in MiB of float32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args()
    paths = [False, True] if ACCELERATOR_AVAILABLE else [False]
    print(f"{'codec':6} {'MiB':>4} {'path':6} {'encode':>8} {'decode':>8} {'dec_add':>8}  GB/s")
    for mib in (int(s) for s in args.sizes.split(",")):
        n = mib * (1 << 18)
        x = np.random.default_rng(7).uniform(-1.0, 1.0, n).astype(np.float32)
        buf, acc = np.empty(n, np.float32), np.zeros(n, np.float32)
        number = max(1, 64 // mib)
        for cls in (Uint8Codec, Uint4Codec):
            for fast in paths:
                codec = cls(args.block_size, accelerated=fast)
                data = codec.encode(x)
                calls: list[Callable[[], Any]] = [
                    functools.partial(codec.encode, x),
                    functools.partial(codec.decode, data, n, out=buf),
                    functools.partial(codec.decode_add, data, acc, buf),
                ]
                gbps = [4 * n / best(call, number, args.repeats) / 1e9 for call in calls]
                print(
                    f"{codec.name:6} {mib:>4} {'C' if fast else 'numpy':6} "
                    + " ".join(f"{g:8.2f}" for g in gbps)
                )


if __name__ == "__main__":
    main()
