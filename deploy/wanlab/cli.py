"""``python -m wanlab up|down|ceiling``: one command builds a lab, one removes it.

``up`` returns once the lab is built; the delay line keeps running in the
router namespace until ``down``. A failure or Ctrl-C (or SIGTERM) during
``up`` removes whatever was built. ``down`` removes every namespace of the
named lab (all labs without ``--name``), killing what runs in them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from wanlab.lab import ENGINES, Lab, LabError, down
from wanlab.measure import ceiling
from wanlab.spec import LabSpec, SpecError, parse_loss, parse_rate, parse_time


def _spec(args: argparse.Namespace) -> LabSpec:
    spec = LabSpec(
        hosts=args.hosts,
        rate_bit=None if args.rate == "none" else parse_rate(args.rate),
        rtt_s=parse_time(args.rtt),
        loss=parse_loss(args.loss),
        subnet=args.subnet,
        name=args.name,
        mtu=args.mtu,
    )
    for p in args.pair:
        spec.add_pair(p)
    for h in args.host:
        spec.add_host(h)
    return spec


def describe(spec: LabSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "hosts": [
            {"host": h, "netns": spec.host_ns(h), "addr": spec.addr(h)} for h in range(spec.hosts)
        ],
        "router_netns": spec.router_ns,
        "bottleneck_mbit": None if (b := spec.bottleneck_bit()) is None else b / 1e6,
        "spec": spec.to_json(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wanlab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab")
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--rate", default="1gbit", help="every host's access link, both ways; none")
    up.add_argument("--rtt", default="100ms", help="round trip between any two hosts")
    up.add_argument("--loss", default="0", help="drop probability per direction, e.g. 0.1%%")
    up.add_argument("--pair", action="append", default=[], metavar="A,B:rtt=..,rate=..,loss=..",
                    help="a pair's own settings (A>B:delay=.. for one direction)")  # fmt: skip
    up.add_argument("--host", action="append", default=[], metavar="I:rate=..|up=..,down=..",
                    help="a host's own access link")  # fmt: skip
    up.add_argument("--name", default="wl")
    up.add_argument("--subnet", type=int, default=201, help="labs use 10.SUBNET.0.0/16")
    up.add_argument("--mtu", type=int, default=65000)
    up.add_argument("--delay-line", choices=ENGINES, default="auto", help="auto: C if it builds")
    up.add_argument("--json", action="store_true")
    dn = sub.add_parser("down", help="remove a lab (every lab without --name)")
    dn.add_argument("--name")
    dn.add_argument("--json", action="store_true")
    ce = sub.add_parser("ceiling", help="measure the delay line's own ceiling")
    ce.add_argument("--hosts", type=int, default=4)
    ce.add_argument("--rtt", action="append", help="RTTs to measure at (default 0ms and 100ms)")
    ce.add_argument("--seconds", type=float, default=4.0)
    ce.add_argument("--streams", type=int, default=16)
    ce.add_argument("--delay-line", choices=ENGINES, default="auto")
    ce.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through Lab.up's cleanup.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.cmd == "up":
            spec = _spec(args)
            lab = Lab(spec, args.delay_line).up()
            out: Any = {**describe(spec), "delay_line": lab.engine}
        elif args.cmd == "down":
            out = {"removed": down(f"wanlab-{args.name}-" if args.name else "wanlab-")}
        else:
            rtts = [parse_time(t) for t in (args.rtt or ["0ms", "100ms"])]
            out = [
                ceiling(args.hosts, r, seconds=args.seconds, streams=args.streams,
                        engine=args.delay_line)
                for r in rtts
            ]  # fmt: skip
    except (SpecError, LabError) as e:
        print(f"wanlab: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.cmd == "up":
        for h in out["hosts"]:
            print(f"host {h['host']}: {h['addr']}  (ip netns exec {h['netns']} ...)")
    elif args.cmd == "down":
        print(f"removed {len(out['removed'])} namespaces")
    else:
        for c in out:
            idle = f"{c['rtt_median_ms']} ms (min {c['rtt_min_ms']}, max {c['rtt_max_ms']})"
            busy = f"{c['loaded_rtt_median_ms']} ms (max {c['loaded_rtt_max_ms']})"
            print(f"{c['engine']} delay line, rtt {c['rtt_set_ms']} ms: {c['total_mbit']} Mbit/s "
                  f"over {c['hosts']} flows, delay line cpu {c['delay_line_cpu']:.0%}; rtt seen "
                  f"idle {idle}, under load {busy}")  # fmt: skip
    return 0
