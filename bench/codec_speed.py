"""Codec throughput: encode and decode speed of every collnet codec.

Each codec from ``collnet.codec.registry.get_codec`` encodes a float32 array
(uniform in [-1, 1), 4 MiB by default) and decodes it back into a
preallocated output, ``repeats`` times each after one untimed warm-up call;
the median time is turned into GB/s of float32 input (so 4 MiB / t / 1e9 for
both directions, whatever the encoded size). Single thread, this process only.

Run on its own::

    python bench/codec_speed.py --size 4MiB --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
from collnet_lab.localcluster import parse_size

from collnet.codec.registry import CODEC_NAMES, get_codec


def measure(codecs: list[str], nbytes: int, repeats: int) -> dict[str, Any]:
    n = max(1, nbytes // 4)
    x = np.random.default_rng(7).uniform(-1.0, 1.0, n).astype(np.float32)
    out_buf = np.empty(n, dtype=np.float32)
    res: dict[str, Any] = {"bytes": n * 4, "repeats": repeats, "codecs": {}}
    for name in codecs:
        codec = get_codec(name)
        enc = codec.encode(x)  # warm-up
        codec.decode(enc, n, out=out_buf)
        et, dt = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc = codec.encode(x)
            et.append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            codec.decode(enc, n, out=out_buf)
            dt.append(time.perf_counter() - t0)
        te, td = statistics.median(et), statistics.median(dt)
        res["codecs"][name] = {
            "encode_gbps": n * 4 / te / 1e9,
            "decode_gbps": n * 4 / td / 1e9,
            "encode_s": te,
            "decode_s": td,
            "encoded_bytes": int(enc.nbytes),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codecs", default=",".join(CODEC_NAMES))
    ap.add_argument("--size", default="4MiB")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = measure(args.codecs.split(","), parse_size(args.size), args.repeats)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{'codec':<8} {'encode GB/s':>12} {'decode GB/s':>12} {'ratio':>6}")
        for name, row in res["codecs"].items():
            ratio = res["bytes"] / row["encoded_bytes"]
            print(
                f"{name:<8} {row['encode_gbps']:>12.2f} {row['decode_gbps']:>12.2f} {ratio:>6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
