"""The packet delay line: a TUN device in the router namespace that holds
every IPv4 packet for its path's one-way delay, drops it with the path's loss
probability, and hands it back to the router's stack, which forwards it to
the destination host. End-to-end TCP sees the delay as real RTT (nothing
terminates or re-segments its connections).

The router's policy routing sends packets arriving from a host link into
this device; what the device writes back comes in on it and follows the
main table to the destination's link (see ``netns.py``). Rates are not this
process's job: htb on the veths shapes them.

Single-threaded: one read drains up to ``_BATCH`` packets, then everything
due is written. Packets of one path keep their order (constant delay, ties
broken by arrival). With the lab's 65000-byte MTU a 1 Gbit/s stream is about
2000 packets a second, which keeps Python's per-packet cost small; the lab's
``ceiling`` command measures what this loop carries on the machine at hand.

Run by ``wanlab up``: ``python -m wanlab.delayline --spec FILE --ready FILE``.
``delayline.c`` is the same loop in C (epoll, a timerfd, batched reads): the
lab builds it with gcc at start and prefers it (``engine="auto"``), falling
back to this one where it does not build.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path as FsPath

from wanlab.spec import LabSpec

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_BATCH = 256
DEVICE = "dl0"


def open_tun(name: str) -> int:
    """A non-blocking TUN device (no packet info header); gone when the fd closes."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def path_table(spec: LabSpec) -> dict[bytes, tuple[float, float]]:
    """src+dst address bytes (as they sit at offset 12 of the IPv4 header) -> (delay, loss)."""
    table = {}
    for a in range(spec.hosts):
        for b in range(spec.hosts):
            if a != b:
                p = spec.path(a, b)
                key = socket.inet_aton(spec.addr(a)) + socket.inet_aton(spec.addr(b))
                table[key] = (p.delay_s, p.loss)
    return table


C_SOURCE = FsPath(__file__).with_name("delayline.c")


def build_c(out_dir: FsPath) -> FsPath | None:
    """The C delay line, compiled once per source version; None where gcc fails or is absent."""
    if not C_SOURCE.exists():  # an install without the source
        return None
    digest = hashlib.sha256(C_SOURCE.read_bytes()).hexdigest()[:12]
    exe = out_dir / f"delayline-{digest}"
    if exe.exists():
        return exe
    try:
        r = subprocess.run(["gcc", "-O2", "-o", str(exe), str(C_SOURCE)], capture_output=True)
    except FileNotFoundError:
        return None
    return exe if r.returncode == 0 else None


def c_matrix(spec: LabSpec) -> str:
    """The C loop's path table: ``N SUBNET``, then per (source, destination) delay_ns loss_ppm."""
    rows = [f"{spec.hosts} {spec.subnet}"]
    for a in range(spec.hosts):
        for b in range(spec.hosts):
            p = spec.path(a, b) if a != b else None
            rows.append("0 0" if p is None else f"{round(p.delay_s * 1e9)} {round(p.loss * 1e6)}")
    return "\n".join(rows) + "\n"


class Stats:
    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.lost = 0
        self.foreign = 0  # not IPv4 between two lab hosts: dropped

    def to_json(self) -> dict[str, int]:
        return dict(vars(self))


def run(fd: int, table: dict[bytes, tuple[float, float]], stop: list[bool], stats: Stats) -> None:
    heap: list[tuple[float, int, bytes]] = []
    seq = 0
    rand = random.random
    clock = time.monotonic
    while not stop[0]:
        wait = heap[0][0] - clock() if heap else 0.5
        if wait > 0:
            try:
                select.select([fd], [], [], wait)
            except InterruptedError:
                continue
        now = clock()
        for _ in range(_BATCH):
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                break
            rule = table.get(pkt[12:20])
            if rule is None or pkt[0] >> 4 != 4:
                stats.foreign += 1
                continue
            delay, loss = rule
            if loss and rand() < loss:
                stats.lost += 1
                continue
            heapq.heappush(heap, (now + delay, seq, pkt))
            seq += 1
        now = clock()
        while heap and heap[0][0] <= now:
            pkt = heapq.heappop(heap)[2]
            try:
                os.write(fd, pkt)
            except OSError:
                stats.lost += 1
                continue
            stats.packets += 1
            stats.bytes += len(pkt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wanlab.delayline")
    ap.add_argument("--spec", required=True, help="the lab's spec (JSON)")
    ap.add_argument("--ready", required=True, help="written once the device exists")
    ap.add_argument("--stats", help="counters written here (JSON) on exit")
    args = ap.parse_args(argv)
    spec = LabSpec.from_json(json.loads(FsPath(args.spec).read_text()))
    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fd = open_tun(DEVICE)
    stats = Stats()
    FsPath(args.ready).write_text(json.dumps({"pid": os.getpid(), "device": DEVICE}))
    try:
        run(fd, path_table(spec), stop, stats)
    finally:
        os.close(fd)
        if args.stats:
            FsPath(args.stats).write_text(json.dumps(stats.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
