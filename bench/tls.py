"""What mutual TLS costs an all-reduce: TLS vs plaintext, on loopback and on 1 Gbit/s.

What is measured
----------------
Two clusters run side by side, each a coordinator and ``--peers`` daemons:
one in the shared-secret mode (HMAC handshake, then plaintext) and one with
mutual TLS 1.3 (certificates from ``collnet certs``). Both are timed with
``Comm.bench_all_reduce`` (the daemons allocate a ``--size`` float32 buffer
and reduce it themselves, timing each collective: no IPC, no copies), one
collective at a time, **alternating** plain and TLS for ``--rounds`` rounds,
so drift in the machine's load hits both alike. A sample is the maximum over
ranks of one collective; the first round is a warm-up and dropped; a figure
is the median. ``tls_over_plain`` is plain time / TLS time (1.0: TLS is
free; the bar on the shaped link is >= 0.95).

Two settings, in the same run:

* ``loopback``: every process on 127.0.0.1 (TLS's CPU cost shows in full);
* ``shaped_1gbit``: each daemon in its own network namespace, all joined by
  a bridge in another namespace (where the coordinator runs) through veth
  pairs with ``tbf rate 1gbit`` on both ends, addresses 10.77.0.0/24. The
  namespaces are removed on exit, Ctrl-C included. Needs root (skipped with
  a note otherwise).

Usage::

    python bench/tls.py --json
    python bench/tls.py --peers 3 --size 64MiB --rounds 7 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import collnet_client
from collnet_daemon.certs import issue, make_ca
from collnet_lab.localcluster import LocalCluster, parse_size

SUBNET = "10.77.0"
BRIDGE_NS = f"cnbench-br-{os.getpid()}"


def log(msg: str) -> None:
    print(f"[tls-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _peer_ns(i: int) -> str:
    return f"cnbench-p{i}-{os.getpid()}"


@contextlib.contextmanager
def shaped_network(peers: int, rate: str) -> Iterator[None]:
    """Namespaces and veths as described in the module docstring; removed after."""
    made: list[str] = []
    try:
        _sh("ip", "netns", "add", BRIDGE_NS)
        made.append(BRIDGE_NS)
        br = ["ip", "netns", "exec", BRIDGE_NS]
        _sh(*br, "ip", "link", "add", "br0", "type", "bridge")
        _sh(*br, "ip", "addr", "add", f"{SUBNET}.254/24", "dev", "br0")
        _sh(*br, "ip", "link", "set", "br0", "up")
        _sh(*br, "ip", "link", "set", "lo", "up")
        for i in range(peers):
            ns = _peer_ns(i)
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            inside, outside = f"cnv{i}-{os.getpid() % 100000}", f"cnb{i}-{os.getpid() % 100000}"
            _sh("ip", "link", "add", inside, "netns", ns, "type", "veth", "peer", outside)
            _sh("ip", "link", "set", outside, "netns", BRIDGE_NS)
            pe = ["ip", "netns", "exec", ns]
            _sh(*pe, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", inside)
            _sh(*pe, "ip", "link", "set", inside, "up")
            _sh(*pe, "ip", "link", "set", "lo", "up")
            _sh(*br, "ip", "link", "set", outside, "master", "br0")
            _sh(*br, "ip", "link", "set", outside, "up")
            # Both directions of every peer's link are shaped.
            for where, dev in ((pe, inside), (br, outside)):
                _sh(*where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", "512kb", "latency", "50ms")  # fmt: skip
        yield
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class BenchCluster(LocalCluster):
    """A ``LocalCluster`` whose processes get per-name flags (TLS files, listen
    addresses) and, in the shaped setting, run in their network namespace."""

    def __init__(self, flags: dict[str, list[str]], netns: dict[str, str], **kw: Any) -> None:
        super().__init__(**kw)
        self.flags = flags
        self.netns = netns

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        name = "coordinator" if args[0] == "coordinator" else args[args.index("--peer-id") + 1]
        args = [*args, *self.flags.get(name, [])]
        ns = self.netns.get(name)
        if ns is None:
            return super()._spawn(args, log_name)
        logf = open(self.dir / log_name, "wb")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    "-m",
                    "collnet_daemon",
                    "--log-level",
                    self.log_level,
                    *args,
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            logf.close()


def _cluster(
    mode: str, shaped: bool, peers: int, pki: Path, secret: Path, workdir: Path
) -> BenchCluster:
    flags: dict[str, list[str]] = {}
    netns: dict[str, str] = {}
    names = ["coordinator", *(f"peer{i:02d}" for i in range(peers))]
    for i, name in enumerate(names):
        f = flags.setdefault(name, [])
        if mode == "tls":
            f += ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt")]
            f += ["--tls-key", str(pki / f"{name}.key")]
        else:
            f += ["--secret-file", str(secret)]
        if shaped:
            host = f"{SUBNET}.254" if i == 0 else f"{SUBNET}.{i}"
            f += ["--listen", f"{host}:0"]
            netns[name] = BRIDGE_NS if i == 0 else _peer_ns(i - 1)
    return BenchCluster(flags, netns, peers=peers, connections=4, workdir=workdir / mode)


def _time_once(comms: list[Any], count: int, tag: str) -> float:
    with ThreadPoolExecutor(len(comms)) as pool:
        futures = [
            pool.submit(c.bench_all_reduce, count, tag=tag, iters=1, timeout_s=600) for c in comms
        ]
        return max(f.result()[0] for f in futures)


def measure(args: argparse.Namespace, shaped: bool, pki: Path, secret: Path) -> dict[str, Any]:
    setting = "shaped_1gbit" if shaped else "loopback"
    with tempfile.TemporaryDirectory(prefix="collnet-tlsbench-") as tmp:
        clusters = {
            m: _cluster(m, shaped, args.peers, pki, secret, Path(tmp)) for m in ("plain", "tls")
        }
        comms: dict[str, list[Any]] = {}
        try:
            for mode, cluster in clusters.items():
                cluster.start()
                comms[mode] = [collnet_client.connect(d.ipc, timeout_s=60) for d in cluster.daemons]
                with ThreadPoolExecutor(args.peers) as pool:
                    list(pool.map(lambda c: c.update_topology(timeout_s=60), comms[mode]))
            samples: dict[str, list[float]] = {"plain": [], "tls": []}
            count = args.nbytes // 4
            for r in range(args.rounds + 1):
                order = ("plain", "tls") if r % 2 == 0 else ("tls", "plain")
                for mode in order:
                    t = _time_once(comms[mode], count, f"{setting}-{mode}-{r}")
                    if r > 0:  # round 0 is the warm-up
                        samples[mode].append(t)
                log(f"{setting} round {r}: plain {samples['plain'][-1:] or '-'} "
                    f"tls {samples['tls'][-1:] or '-'}")  # fmt: skip
        except BaseException:
            for cluster in clusters.values():
                log(f"logs of {cluster.dir}:\n{cluster.logs()}")
            raise
        finally:
            for cs in comms.values():
                for c in cs:
                    c.close()
            for cluster in clusters.values():
                cluster.stop()
    plain, tls = statistics.median(samples["plain"]), statistics.median(samples["tls"])
    return {
        "plain_s": round(plain, 4),
        "tls_s": round(tls, 4),
        "plain_gbit_s": round(args.nbytes * 8 / plain / 1e9, 3),
        "tls_gbit_s": round(args.nbytes * 8 / tls / 1e9, 3),
        "tls_over_plain": round(plain / tls, 3),
        "samples": {k: [round(x, 4) for x in v] for k, v in samples.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", default="1gbit", help="tbf rate of the shaped link")
    ap.add_argument("--no-shaped", action="store_true", help="loopback only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.nbytes = parse_size(args.size)
    # Ctrl-C and SIGTERM unwind through the context managers (namespaces removed).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="collnet-tlsbench-pki-") as tmp:
        pki = Path(tmp)
        make_ca(pki)
        for name in ["coordinator", *(f"peer{i:02d}" for i in range(args.peers))]:
            issue(pki, name, pki)
        secret = pki / "secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        result: dict[str, Any] = {
            "size_bytes": args.nbytes,
            "peers": args.peers,
            "rounds": args.rounds,
            "loopback": measure(args, False, pki, secret),
        }
        if args.no_shaped:
            pass
        elif os.geteuid() != 0:
            result["shaped_1gbit"] = {"skipped": "needs root for network namespaces"}
        else:
            with shaped_network(args.peers, args.rate):
                result["shaped_1gbit"] = measure(args, True, pki, secret)
                result["shaped_1gbit"]["rate"] = args.rate
    result["tls_over_plain"] = {
        k: result[k]["tls_over_plain"]
        for k in ("loopback", "shaped_1gbit")
        if "tls_over_plain" in result.get(k, {})
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result["tls_over_plain"].items():
            print(f"{k}: tls_over_plain {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
