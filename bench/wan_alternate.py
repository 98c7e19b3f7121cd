"""Series of timed all-reduces in the WAN lab, schedules alternating round by round.

``bench/wan.py`` times each schedule once, in a fixed order, over 3 samples,
so a schedule whose series happens to meet a slow stretch of the links looks
slower than another that builds the same messages. Alternating the schedules
over several rounds, in one cluster, tells the two apart:

    python bench/wan_alternate.py --rate-mbit 400 --rtt-ms 200 --codec uint4 --algos auto,direct
    python bench/wan_alternate.py --rounds 4 --samples 6 --json

Prints, per round and schedule, the samples (the slowest rank's seconds,
after one dropped warm-up), then each schedule's median over all rounds, and
what ``auto`` picks on the agreed link figures. Needs root (network
namespaces).
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from collnet_lab.localcluster import parse_size
from wan import _auto_pick, collnet_in
from wanlab import Lab, LabSpec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--codec", default="uint4", help="none, uint8 or uint4")
    ap.add_argument("--algos", default="auto,direct", help="Comma-separated schedules.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4, help="Timed all-reduces per series.")
    ap.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    algos = args.algos.split(",")
    spec = LabSpec(hosts=args.hosts, rate_bit=int(args.rate_mbit * 1e6),
                   rtt_s=args.rtt_ms / 1e3, loss=0.0, name="wanb", subnet=231)  # fmt: skip
    series: dict[str, list[list[float]]] = {a: [] for a in algos}
    with Lab(spec, "auto") as lab, collnet_in(lab, "auto", []) as c:
        c.await_matrix()
        c.agree()
        c.warm(size)
        pick = _auto_pick(args.hosts, size, args.codec, c.costs())
        for rnd in range(args.rounds):
            for algo in algos:
                times = [round(t, 4) for t in c.time(size, args.samples, args.codec, algo)]
                series[algo].append(times)
                if not args.json:
                    print(f"round {rnd} {algo}: {times}", flush=True)
    out: dict[str, Any] = {
        "rate_mbit": args.rate_mbit,
        "rtt_ms": args.rtt_ms,
        "size": size,
        "codec": args.codec,
        "auto_picks": pick,
        "series": series,
        "median_s": {a: statistics.median(t for s in ss for t in s) for a, ss in series.items()},
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"auto picks {pick}; medians over all rounds: {out['median_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
