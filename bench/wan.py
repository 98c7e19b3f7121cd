"""collnet and gloo over a WAN lab: busbw as a fraction of the bottleneck link.

What is measured
----------------
``wanlab`` (deploy/wanlab) builds ``--hosts`` network namespaces joined by a
router; every host's access link is shaped to ``--rate-mbit`` both ways (htb)
and every packet between two hosts waits ``--rtt-ms``/2 each way in the
user-space delay line, so end-to-end TCP sees the round trip. One daemon runs
in each host namespace, the coordinator in the router's, and in the same run,
over the same links:

* collnet fp32, uint8 and uint4 all-reduces of ``--size`` (float32 bytes),
  timed inside the daemons (``Comm.bench_all_reduce``; a tiny barrier
  all-reduce precedes each), with striping (``--connections``: the daemon's
  default ``auto``, or a fixed K, which adds an ``auto`` row) and without
  (1 connection): ``striping_gain`` is the fp32 ratio;
* the 1 MiB latency of collnet star, ring, direct and auto, and of gloo;
  ``auto_check``: star, ring, direct and auto at 4 KiB, 1 MiB and ``--size``
  (fp32), with auto over the best of star and ring (bar: <= 1.1). The
  busbw runs use ``auto`` too, decided on the link figures the daemons
  measured and the coordinator agreed (the bench waits for every pair's),
  and ``*_busbw_over_link_by_algo`` puts them beside the ring's and the
  direct schedule's;
* torch.distributed gloo (``bench/gloo_worker.py`` in each host namespace);
* the delay line's own ceiling (``wanlab.measure.ceiling``: a ring of TCP
  flows through an unshaped lab at the same RTT) and whether the scenario
  (hosts x rate) fits under it;
* ``topology_gain``: a 4-host lab whose "diagonal" pairs are 4x slower,
  daemons joined in the bad ring order; fp32 busbw with the coordinator's
  ring planner (``--ring-order planned``) over busbw in join order, next to
  what the links predict (4x). ``null`` with a reason where the coordinator
  has no ``--ring-order``.

A sample is the slowest rank's time of one collective; the first of each
series is a warm-up and dropped, and each cluster first runs 4 untimed fp32
all-reduces of ``--size`` (new connections ramp up); figures are medians of
``--repeats``.
busbw = bytes / time x 2(N-1)/N; ``*_busbw_over_link`` divides it by the
bottleneck link's rate (so uint8 can exceed 1: fewer bytes travel).
``bound_over_link`` is the most any all-reduce could reach on these links
(each rank's link carries 2(N-1)/N of the encoded bytes, and the last one
then takes half a round trip): at 4 hosts, 1 Gbit/s, 100 ms and 64 MiB,
0.942 (fp32), 3.20x (uint8), 5.34x (uint4).

``overlapped_busbw_over_link``: ``--overlap`` all-reduces of ``--size`` started
at once by each trainer through the SDK (as DDP's buckets or streaming
DiLoCo's fragments overlap), per codec; their bytes over the time to the last
one's end, against the link, beside the same bound for all their bytes, and
how busy this machine's CPUs were meanwhile (``cpu_busy``). One collective
cannot hide its round trips; overlapped ones hide each other's.

``--sweep`` measures fp32, uint8 and gloo at each of ``--sweep-rtts`` and
draws docs/wan_busbw_vs_rtt.png. Needs root (network namespaces).

Usage::

    python bench/wan.py --json
    python bench/wan.py --hosts 4 --rate-mbit 400 --rtt-ms 100 --size 64MiB --repeats 3 --json
    python bench/wan.py --sweep --rate-mbit 400 --size 16MiB --json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import collnet_client
import numpy as np
from allreduce import GLOO_WORKER, busbw, gloo_unavailable_reason, max_over_ranks
from collnet_lab.localcluster import parse_size
from tls import BenchCluster
from wanlab import Lab, LabSpec
from wanlab.lab import child_env
from wanlab.measure import ceiling

from collnet.algo.select import choose_algorithm, wire_nbytes
from collnet.codec import get_codec
from collnet.topology.costmodel import LinkCosts

HERE = Path(__file__).resolve().parent
PLOT = HERE.parent / "docs" / "wan_busbw_vs_rtt.png"
GLOO_PORT = 29555
CODECS = {"fp32": "none", "uint8": "uint8", "uint4": "uint4"}
# Bits per element on the wire, for the bounds (codec scales left out).
CODEC_BITS = {"fp32": 32, "uint8": 8, "uint4": 4}
ALGOS = ("star", "ring", "direct", "auto")
WARM_UP = 4


def log(msg: str) -> None:
    print(f"[wan-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _med(samples: list[float]) -> float:
    return statistics.median(samples)


class Collnet:
    """A coordinator (router namespace) and one daemon per host, with SDK comms to each."""

    def __init__(
        self, lab: Lab, connections: str, extra: list[str], workdir: Path,
        coordinator: list[str], order: list[int],
    ) -> None:  # fmt: skip
        """``order[k]``: the host of the k-th daemon to join (peer id ``peer<k>``)."""
        s = lab.spec
        flags = {"coordinator": ["--listen", f"{s.gateway(0)}:0", *coordinator]}
        netns = {"coordinator": s.router_ns}
        for k, h in enumerate(order):
            flags[f"peer{k:02d}"] = ["--listen", f"{s.addr(h)}:0", *extra]
            netns[f"peer{k:02d}"] = s.host_ns(h)
        # Without a shared secret the coordinator admits loopback peers only.
        secret = workdir / "secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        self.cluster = BenchCluster(
            flags, netns, peers=s.hosts, connections=connections, workdir=workdir,
            secret_file=secret,
        )  # fmt: skip
        self.comms: list[Any] = []
        self.world = s.hosts
        self.lab_router = s.router_ns
        self._n = 0

    def __enter__(self) -> Collnet:
        try:
            self.cluster.start()
            self.comms = [collnet_client.connect(d.ipc, timeout_s=60) for d in self.cluster.daemons]
            self.agree()
        except BaseException:
            log(f"cluster logs:\n{self.cluster.logs()}")
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self.comms:
            c.close()
        self.cluster.stop()

    def status(self) -> dict[str, Any]:
        """``collnet status --json``, asked from the coordinator's namespace ({} on failure)."""
        c = self.cluster
        cmd = ["ip", "netns", "exec", self.lab_router, sys.executable, "-m", "collnet_daemon",
               "status", "--coordinator", c.coordinator_addr, *c._secret(), "--json"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return {}
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    def links_known(self) -> int:
        """Ordered member pairs with a bandwidth figure in the coordinator's matrix."""
        rows = self.status().get("links") or []
        return sum(1 for r in rows if r.get("bandwidth_bps"))

    def costs(self) -> LinkCosts | None:
        """The current epoch's agreed link figures, on which ``auto`` decides."""
        return LinkCosts.from_wire((self.status().get("world") or {}).get("costs"))

    def await_matrix(self, limit_s: float = 90.0) -> int:
        """Idle (probes run only while no collective does) until every ordered pair of
        members has a bandwidth figure, or ``limit_s``; the pairs known then."""
        want = self.world * (self.world - 1)
        deadline = time.monotonic() + limit_s
        known = self.links_known()
        while known < want and time.monotonic() < deadline:
            time.sleep(2.0)
            known = self.links_known()
        return known

    def agree(self) -> list[str]:
        """The update_topology barrier; the ring order (peer ids) agreed on."""
        with ThreadPoolExecutor(len(self.comms)) as pool:
            worlds = list(pool.map(lambda c: c.update_topology(timeout_s=120), self.comms))
        return list(worlds[0].peers)

    def warm(self, nbytes: int) -> None:
        """Fresh connections first: ``WARM_UP`` fp32 all-reduces of ``nbytes``, untimed.
        A new TCP connection's congestion control (BBR here) takes seconds of
        traffic to reach a long fat link's rate (in this lab the first 64 MiB
        series ran at 0.69-0.73 of the link, the same schedule right after it at
        0.93), which would be charged to whichever series ran first."""
        self.time(nbytes, WARM_UP - 1)

    def time(
        self, nbytes: int, iters: int, codec: str = "none", algo: str = "auto", warm_up: bool = True
    ) -> list[float]:
        """``iters`` samples of the slowest rank (``warm_up``: one more first, dropped)."""
        self._n += 1
        tag = f"wan-{self._n}-{codec}-{algo}"
        extra = 1 if warm_up else 0
        with ThreadPoolExecutor(len(self.comms)) as pool:
            futs = [
                pool.submit(c.bench_all_reduce, nbytes // 4, tag=tag, iters=iters + extra,
                            codec=codec, algo=algo, timeout_s=1800)
                for c in self.comms
            ]  # fmt: skip
            return max_over_ranks([f.result() for f in futs])[extra:]

    def time_overlapped(
        self, nbytes: int, streams: int, iters: int, codec: str = "none"
    ) -> list[float]:
        """``iters`` samples of the slowest rank, each ``streams`` all-reduces of
        ``nbytes`` started at once (one untimed round first)."""
        self._n += 1
        tag = f"wan-o{self._n}-{codec}"
        with ThreadPoolExecutor(len(self.comms)) as pool:
            futs = [
                pool.submit(_overlapped, c, nbytes, streams, iters + 1, codec, tag)
                for c in self.comms
            ]
            return max_over_ranks([f.result() for f in futs])[1:]


def _overlapped(
    comm: Any, nbytes: int, streams: int, iters: int, codec: str, tag: str
) -> list[float]:
    """One rank's share of ``Collnet.time_overlapped``: trainer all-reduces through
    the SDK (shared memory, no copy), as DDP's buckets or streaming DiLoCo's
    fragments overlap them; each sample from a direct one-element all-reduce (the
    barrier ``bench_all_reduce`` uses) to the last one's end."""
    rng = np.random.default_rng(comm.rank)
    bufs = [comm.empty(nbytes // 4, np.float32) for _ in range(streams)]
    for b in bufs:
        b[:] = rng.standard_normal(b.size, dtype=np.float32)
    times = []
    for i in range(iters):
        comm.all_reduce(np.ones(1, np.float32), algo="direct", tag=f"{tag}-b{i}")
        t0 = time.perf_counter()
        handles = [
            comm.all_reduce_async(b, op="avg", codec=codec, tag=f"{tag}-{i}-{k}", timeout_s=1800)
            for k, b in enumerate(bufs)
        ]
        for h in handles:
            h.wait()
        times.append(time.perf_counter() - t0)
    return times


def _auto_pick(world: int, nbytes: int, codec: str, costs: LinkCosts | None) -> str:
    """The schedule ``auto`` runs for an fp32 tensor of ``nbytes`` under ``codec``."""
    buf = np.empty(nbytes // 4, np.float32)
    wire = wire_nbytes(buf, None if codec == "none" else get_codec(codec))
    return choose_algorithm("auto", world, nbytes, costs=costs, wire_nbytes=wire)


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU of this machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _with_cpu_busy(series: Callable[[], list[float]]) -> tuple[list[float], float]:
    """``series()``'s samples, and the share of this machine's CPUs busy meanwhile."""
    before = _cpu_ticks()
    samples = series()
    after = _cpu_ticks()
    return samples, round((after[0] - before[0]) / max(1, after[1] - before[1]), 3)


def run_gloo(lab: Lab, jobs: list[tuple[int, int]]) -> dict[int, list[float]]:
    """gloo workers in the host namespaces; per size the samples of the slowest rank."""
    s = lab.spec
    env = {**child_env(), "GLOO_SOCKET_IFNAME": "eth0"}
    job_arg = ",".join(f"{nb}:{it}" for nb, it in jobs)
    procs = [
        lab.popen(h, sys.executable, str(GLOO_WORKER), "--rank", str(h), "--world", str(s.hosts),
                  "--init", f"tcp://{s.addr(0)}:{GLOO_PORT}", "--jobs", job_arg, "--no-check",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for h in range(s.hosts)
    ]  # fmt: skip
    try:
        rows = []
        for p in procs:
            out, err = p.communicate(timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"gloo worker failed ({p.returncode}): {err.decode()[-2000:]}")
            rows.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {nb: max_over_ranks([r["sizes"][str(nb)]["times_s"] for r in rows]) for nb, _ in jobs}


@contextmanager
def collnet_in(
    lab: Lab, connections: str, extra: list[str],
    coordinator: list[str] | None = None, order: list[int] | None = None,
) -> Iterator[Collnet]:  # fmt: skip
    hosts = order if order is not None else list(range(lab.spec.hosts))
    with (
        tempfile.TemporaryDirectory(prefix="collnet-wan-") as tmp,
        Collnet(lab, connections, extra, Path(tmp), coordinator or [], hosts) as c,
    ):
        yield c


def over_link(nbytes: int, t: float, world: int, link_bit: float) -> float:
    return round(busbw(nbytes, t, world) * 1e9 * 8 / link_bit, 3)


def bound_over_link(nbytes: int, world: int, link_bit: float, rtt_s: float, bits: int) -> float:
    """The most any all-reduce can reach here, as ``over_link``: every rank's access
    link carries at least 2(W-1)/W of the tensor's encoded bytes, and the last
    byte still has half a round trip to go (codec scales left out)."""
    wire_bit = nbytes * 8 * bits / 32 * 2 * (world - 1) / world
    return over_link(nbytes, wire_bit / link_bit + rtt_s / 2, world, link_bit)


def bounds_over_link(nbytes: int, world: int, link_bit: float, rtt_s: float) -> dict[str, float]:
    """``bound_over_link`` per codec."""
    return {
        name: bound_over_link(nbytes, world, link_bit, rtt_s, bits)
        for name, bits in CODEC_BITS.items()
    }


def scenario(args: argparse.Namespace, rtt_ms: float, full: bool) -> dict[str, Any]:
    """One lab at ``rtt_ms``; ``full`` adds uint4, 1 connection and the 1 MiB latencies."""
    spec = LabSpec(hosts=args.hosts, rate_bit=int(args.rate_mbit * 1e6), rtt_s=rtt_ms / 1e3,
                   loss=args.loss, name="wanb", subnet=231)  # fmt: skip
    link = float(args.rate_mbit * 1e6)
    n, size, reps = args.hosts, args.nbytes, args.repeats
    mib = 1 << 20
    out: dict[str, Any] = {"rtt_ms": rtt_ms, "link_mbit": args.rate_mbit, "hosts": n}
    out["bound_over_link"] = bounds_over_link(size, n, link, rtt_ms / 1e3)
    samples: dict[str, list[float]] = {}
    with Lab(spec, args.delay_line) as lab:
        log(f"lab up: {n} hosts, {args.rate_mbit} Mbit/s, {rtt_ms} ms")
        with collnet_in(lab, args.connections, args.daemon_arg) as c:
            # auto decides on the epoch's agreed link figures: measured, then agreed.
            out["pairs_measured"] = c.await_matrix()
            c.agree()
            c.warm(size)
            costs = c.costs()
            out["costs"] = None if costs is None else costs.to_wire()
            picks: dict[str, str] = {}
            busy: dict[str, float] = {}
            for name, codec in CODECS.items():
                if name == "uint4" and not full:
                    continue
                samples[name], busy[name] = _with_cpu_busy(partial(c.time, size, reps, codec))
                out[f"{name}_busbw_over_link"] = over_link(size, _med(samples[name]), n, link)
                picks[name] = _auto_pick(n, size, codec, costs)
                log(f"collnet {name}: {out[f'{name}_busbw_over_link']} of link")
                if full:
                    # What auto chose against each schedule it chooses from.
                    by_algo = {"auto": out[f"{name}_busbw_over_link"]}
                    for algo in ("ring", "direct"):
                        t = c.time(size, reps, codec, algo)
                        samples[f"{name}_{algo}"] = t
                        by_algo[algo] = over_link(size, _med(t), n, link)
                    out[f"{name}_busbw_over_link_by_algo"] = by_algo
                    log(f"collnet {name} by algorithm: {by_algo}")
            # What auto ran (the daemon's rule on these figures), and how busy this
            # machine's CPUs were over each series (daemons, trainers, delay line).
            out["auto_picks"] = picks
            out["cpu_busy"] = busy
            if full and args.overlap > 1:
                # A trainer with several all-reduces in flight (DDP's buckets,
                # streaming DiLoCo's fragments) hides each one's latency behind
                # the others' bytes: what the links carry then, against their rate.
                k = args.overlap
                overlapped: dict[str, Any] = {"streams": k}
                # This machine's CPUs, all daemons and trainers together, over each
                # series: near 1, the codecs are bound by CPU here, not by the links.
                overlapped_busy: dict[str, float] = {}
                for name, codec in CODECS.items():
                    t, overlapped_busy[name] = _with_cpu_busy(
                        partial(c.time_overlapped, size, k, reps, codec)
                    )
                    samples[f"{name}_overlapped"] = t
                    overlapped[name] = over_link(k * size, _med(t), n, link)
                overlapped["cpu_busy"] = overlapped_busy
                overlapped["bound"] = bounds_over_link(k * size, n, link, rtt_ms / 1e3)
                out["overlapped_busbw_over_link"] = overlapped
                log(f"collnet, {k} all-reduces in flight: {overlapped}")
            if full:
                checks = {"4KiB": 4 << 10, "1MiB": mib, _size_name(size): size}
                auto_check: dict[str, dict[str, Any]] = {}
                for label, nb in checks.items():
                    times = {a: c.time(nb, reps, algo=a) for a in ALGOS}
                    if label == "1MiB":
                        lat = dict(times)
                    row: dict[str, Any] = _auto_row({a: _med(t) for a, t in times.items()})
                    # What auto picks for an fp32 tensor of this size (the daemon's own rule).
                    row["auto_picks"] = choose_algorithm("auto", n, nb, costs=costs)
                    row["samples_s"] = {a: [round(x, 4) for x in t] for a, t in times.items()}
                    auto_check[label] = row
                    log(f"auto at {label}: {row}")
                out["auto_check"] = auto_check
        if full and args.connections != "auto":
            with collnet_in(lab, "auto", args.daemon_arg) as c:
                c.warm(size)
                samples["fp32_auto_conn"] = c.time(size, reps)
            auto = over_link(size, _med(samples["fp32_auto_conn"]), n, link)
            out["fp32_auto_conn_busbw_over_link"] = auto
            log(f"collnet fp32, --connections auto: {auto} of link")
        if full:
            with collnet_in(lab, "1", args.daemon_arg) as c:
                c.warm(size)
                samples["fp32_1conn"] = c.time(size, reps)
            one = over_link(size, _med(samples["fp32_1conn"]), n, link)
            out["fp32_1conn_busbw_over_link"] = one
            out["striping_gain"] = round(out["fp32_busbw_over_link"] / one, 3)
            log(f"collnet fp32, 1 connection: {one} of link")
        if args.no_gloo or (why := gloo_unavailable_reason()) is not None:
            out["gloo_busbw_over_link"] = None
            out["gloo_skipped"] = "--no-gloo" if args.no_gloo else why
        else:
            g = run_gloo(lab, [(size, reps + 1), *([(mib, reps + 1)] if full else [])])
            samples["gloo"] = g[size][1:]
            out["gloo_busbw_over_link"] = over_link(size, _med(samples["gloo"]), n, link)
            log(f"gloo: {out['gloo_busbw_over_link']} of link")
            if full:
                lat["gloo"] = g[mib][1:]
        if full:
            out["latency_1MiB_s"] = {k: round(_med(v), 4) for k, v in lat.items()}
        out["delay_line_stats_during_run"] = None  # filled after teardown
    out["delay_line_stats_during_run"] = lab.final_stats
    out["samples_s"] = {k: [round(x, 4) for x in v] for k, v in samples.items()}
    return out


def _size_name(nbytes: int) -> str:
    return f"{nbytes >> 20}MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10}KiB"


def _auto_row(times: dict[str, float]) -> dict[str, float]:
    """Median seconds per algorithm, and auto's time over the best of star and ring
    (the bar: <= 1.1) and over the best of all."""
    row = {a: round(t, 4) for a, t in times.items()}
    row["auto_over_best_star_ring"] = round(times["auto"] / min(times["star"], times["ring"]), 3)
    fixed = [t for a, t in times.items() if a != "auto"]
    row["auto_over_best"] = round(times["auto"] / min(fixed), 3)
    return row


def _has_flag(command: str, text: str) -> bool:
    """Whether ``collnet COMMAND --help`` mentions ``text`` (flags other work adds)."""
    r = subprocess.run([sys.executable, "-m", "collnet_daemon", command, "--help"],
                       capture_output=True, text=True)  # fmt: skip
    return text in " ".join(r.stdout.split())


def _link_rows(spec: LabSpec, join: list[int]) -> list[dict[str, Any]]:
    """The lab's own link figures, as the coordinator's --link-matrix-file reads them."""
    rows = []
    for i, a in enumerate(join):
        for j, b in enumerate(join):
            if a != b:
                rtt = 2 * spec.path(a, b).delay_s
                rows.append({"src": f"peer{i:02d}", "dst": f"peer{j:02d}",
                             "bandwidth_bps": spec.rate(a, b), "rtt_s": rtt})  # fmt: skip
    return rows


def topology(args: argparse.Namespace) -> dict[str, Any]:
    """Ring planning on asymmetric links: 4 hosts whose diagonal pairs (0-2, 1-3) are
    4x slower than the rest, daemons joining in the order 0, 2, 1, 3 (so the join-order
    ring runs over both slow pairs; the best ring avoids them: the links predict 4x).
    Three worlds: join order; planned on measured links; planned on the lab's figures
    given in a --link-matrix-file (the planner alone, without the measurement)."""
    if not _has_flag("coordinator", "--ring-order"):
        why = "the coordinator has no --ring-order: no ring planner here"
        return {"topology_gain": None, "topology_note": why}
    rate = int(args.rate_mbit * 1e6)
    spec = LabSpec(hosts=4, rate_bit=rate, rtt_s=args.rtt_ms / 1e3, name="wantop", subnet=232)
    spec.add_pair(f"0,2:rate={rate // 4}bit")
    spec.add_pair(f"1,3:rate={rate // 4}bit")
    join = [0, 2, 1, 3]
    out: dict[str, Any] = {"topology_predicted_gain": 4.0}
    times: dict[str, list[float]] = {}
    with Lab(spec, args.delay_line) as lab, tempfile.TemporaryDirectory() as tmp:
        links = Path(tmp) / "links.json"
        links.write_text(json.dumps(_link_rows(spec, join)))
        modes = {
            "join": ["--ring-order", "join"],
            "planned": ["--ring-order", "planned"],
            "planned_link_file": ["--ring-order", "planned", "--link-matrix-file", str(links)],
        }
        for mode, flags in modes.items():
            with collnet_in(lab, args.connections, args.daemon_arg, flags, join) as c:
                # Traffic for the links to be measured by, then barriers where a plan applies.
                order = c.agree()
                for _ in range(3 if mode == "planned" else 1):
                    c.time(args.nbytes // 4, 1)
                    order = c.agree()
                    order = c.agree()
                if mode == "planned":
                    # The planner reorders only once every pair has a figure, and the
                    # pairs no ring uses are measured by idle-time probes alone.
                    out["topology_pairs_measured"] = c.await_matrix()
                    order = c.agree()
                    order = c.agree()
                times[mode] = c.time(args.nbytes, args.repeats)
            hosts = [join[int(p.removeprefix("peer"))] for p in order if p.startswith("peer")]
            out[f"topology_ring_{mode}"] = hosts
            log(f"ring {mode}: hosts {hosts}, {_med(times[mode]):.3f} s")
    for mode, key in (
        ("planned", "topology_gain"),
        ("planned_link_file", "topology_gain_link_file"),
    ):
        gain = _med(times["join"]) / _med(times[mode])
        out[key] = round(gain, 3)
        out[f"{key}_fraction_of_predicted"] = round((gain - 1) / (4.0 - 1), 3)
    out["topology_samples_s"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    return out


def plot(points: list[dict[str, Any]], path: Path, nbytes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rtts = [p["rtt_ms"] for p in points]
    for key, label in (("fp32_busbw_over_link", "collnet fp32"),
                       ("uint8_busbw_over_link", "collnet uint8"),
                       ("gloo_busbw_over_link", "gloo fp32")):  # fmt: skip
        ys = [p.get(key) for p in points]
        if any(y is not None for y in ys):
            ax.plot(rtts, [float("nan") if y is None else y for y in ys], "o-", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("round-trip time (ms)")
    ax.set_ylabel("busbw / bottleneck link")
    p0 = points[0]
    ax.set_title(
        f"all-reduce of {nbytes / 2**20:g} MiB over the WAN lab: "
        f"{p0['hosts']} hosts, {p0['link_mbit']:g} Mbit/s links"
    )
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability per direction")
    ap.add_argument(
        "--connections",
        default="auto",
        help="K of the striped runs: auto (the daemon's default) or 1-64",
    )
    ap.add_argument(
        "--overlap",
        type=int,
        default=4,
        help="all-reduces in flight at once for overlapped_busbw_over_link (<2: skip)",
    )
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra daemon flag")
    ap.add_argument("--no-topology", action="store_true", help="skip topology_gain")
    ap.add_argument("--only-topology", action="store_true", help="topology_gain alone")
    ap.add_argument("--delay-line", choices=["auto", "c", "python"], default="auto")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="busbw vs RTT, and the plot")
    ap.add_argument("--sweep-rtts", default="0,50,100,150,200")
    ap.add_argument("--plot", default=str(PLOT))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.nbytes = parse_size(args.size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/wan.py needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind: labs removed
    result: dict[str, Any]
    rtts = [float(r) for r in args.sweep_rtts.split(",")] if args.sweep else [args.rtt_ms]
    ceil_mbit = None
    if not args.no_ceiling:
        log(f"delay line ceiling at {max(rtts)} ms")
        ceil = ceiling(args.hosts, max(rtts) / 1e3, seconds=4.0, engine=args.delay_line)
        ceil_mbit = ceil["total_mbit"]
    if args.only_topology:
        result = topology(args)
    elif args.sweep:
        points = [scenario(args, r, full=False) for r in rtts]
        plot(points, Path(args.plot), args.nbytes)
        result = {"sweep": points, "plot": str(args.plot)}
    else:
        result = scenario(args, args.rtt_ms, full=True)
        if args.no_topology:
            result["topology_gain"] = None
            result["topology_note"] = "skipped (--no-topology)"
        else:
            result.update(topology(args))
    result["delay_line_ceiling_mbit"] = ceil_mbit
    if ceil_mbit is not None:
        result["delay_line_ceiling"] = ceil
        result["within_ceiling"] = args.hosts * args.rate_mbit <= ceil_mbit
    result["size_bytes"] = args.nbytes
    result["repeats"] = args.repeats
    result["connections"] = args.connections
    result["loadavg_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for point in result.get("sweep", [result]):
            row = {k: v for k, v in point.items() if k.endswith("over_link") or k.endswith("gain")}
            print(f"rtt {point['rtt_ms']} ms, link {point['link_mbit']} Mbit/s: "
                  + ", ".join(f"{k} {v}" for k, v in row.items()))  # fmt: skip
        print(f"delay line ceiling: {ceil_mbit} Mbit/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
