"""A real lab: namespaces, htb, the delay line; RTT, rate, loss and teardown as TCP sees them.

Needs root and ``ip netns`` (CI runs as root); skipped otherwise. Settings are
kept small (tens of Mbit/s, tens of ms) so the module takes well under a
minute on two shared cores and the loads of other tests do not move rates.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wanlab import Lab, LabError, LabSpec, down
from wanlab.lab import child_env, namespaces
from wanlab.measure import Probes

from collnet.topology.striping import UNKNOWN_LINK_CONNECTIONS, connections_for

pytestmark = pytest.mark.timeout(60)


def _netns_usable() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


if not _netns_usable():
    pytest.skip("needs root and ip netns", allow_module_level=True)

RTT = 0.040
NEAR_RTT = 0.004


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # 9000-byte packets: at tens of Mbit/s the queues then hold dozens of them.
    spec = LabSpec(hosts=3, rate_bit=80 * 10**6, rtt_s=RTT, name="twl", subnet=221, mtu=9000)
    spec.add_pair(f"0,1:rtt={NEAR_RTT * 1e3}ms,rate=30mbit")
    spec.add_host("2:down=40mbit")
    with Lab(spec) as lab, Probes(lab) as probes:
        lab.probes = probes  # type: ignore[attr-defined]
        yield lab
    assert not namespaces(spec.prefix)


def test_tcp_sees_the_round_trip(lab: Lab) -> None:
    probes: Probes = lab.probes  # type: ignore[attr-defined]
    far = probes.ping(0, 2, count=40)
    near = probes.ping(1, 0, count=15)
    assert RTT * 1e3 <= far["median_ms"] <= RTT * 1e3 + 5
    # No packet sits in the delay line past its time (a missed timer held one
    # until the loop's 500 ms poll timeout): no lost, so no retransmitted, ping.
    assert far["max_ms"] < RTT * 1e3 + 250
    assert NEAR_RTT * 1e3 <= near["median_ms"] <= NEAR_RTT * 1e3 + 5


def test_rates_per_link_pair_and_direction(lab: Lab) -> None:
    probes: Probes = lab.probes  # type: ignore[attr-defined]
    # One at a time: 2 -> 0 (access link, 80), 0 -> 2 (host 2's down link, 40),
    # 1 -> 0 (the pair's own rate, 30).
    for (a, b), want in (((2, 0), 80), ((0, 2), 40), ((1, 0), 30)):
        got = probes.blast([(a, b)], seconds=1.0)[0]["mbit"]
        assert 0.75 * want <= got <= 1.1 * want, f"{a}->{b}: {got} Mbit/s, set {want}"


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("c", marks=pytest.mark.skipif(not shutil.which("gcc"), reason="no gcc")),
        "python",
    ],
)
def test_both_delay_line_engines(engine: str) -> None:
    """The C loop (the default where gcc builds it) and the Python one: RTT and loss."""
    spec = LabSpec(hosts=2, rate_bit=None, rtt_s=0.02, loss=0.05, name=f"t{engine[0]}",
                   subnet=222 if engine == "c" else 226)  # fmt: skip
    lab = Lab(spec, engine)
    with lab, Probes(lab) as probes:
        assert lab.engine == engine
        probes.blast([(0, 1)], seconds=1.0)
        # Loss hits pings too (a retransmission); the median stays on the setting.
        assert 20 <= probes.ping(1, 0, count=15)["median_ms"] <= 25
    s = lab.final_stats
    assert s["packets"] > 200
    assert 0.025 <= s["lost"] / (s["lost"] + s["packets"]) <= 0.08


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = LabSpec(hosts=2, name="tfail", subnet=223)
    monkeypatch.setattr(
        "wanlab.lab.shaping_commands", lambda s: [["tc", "qdisc", "add", "dev", "nosuch0"]]
    )
    lab = Lab(spec)
    with pytest.raises(LabError):
        lab.up()
    assert not namespaces(spec.prefix)
    assert lab.delay_line is not None and lab.delay_line.poll() is not None


def test_cli_interrupted_during_up_leaves_nothing() -> None:
    prefix = "wanlab-tint-"
    cli = subprocess.Popen(
        [sys.executable, "-m", "wanlab", "up", "--hosts", "6", "--name", "tint", "--subnet", "224"],
        env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not any(ns.startswith(f"{prefix}h") for ns in namespaces(prefix)):
        assert time.monotonic() < deadline and cli.poll() is None
        time.sleep(0.01)
    cli.send_signal(signal.SIGINT)
    assert cli.wait(30) != 0
    assert not namespaces(prefix)


def test_cli_up_then_down_and_down_clears_leftovers() -> None:
    env = child_env()
    run = [sys.executable, "-m", "wanlab"]
    subprocess.run([*run, "up", "--hosts", "2", "--name", "tcli", "--subnet", "225"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    assert len(namespaces("wanlab-tcli-")) == 3
    # A leftover from a crashed run: a namespace of the prefix with a process in it.
    subprocess.run(["ip", "netns", "add", "wanlab-tcli-x"], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", "wanlab-tcli-x", "sleep", "300"])
    try:
        subprocess.run([*run, "down", "--name", "tcli"], env=env, check=True, capture_output=True)
        assert not namespaces("wanlab-tcli-")
        assert sleeper.wait(10) != 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        down("wanlab-tcli-")


def test_a_dialler_sizes_an_unknown_link_from_the_round_trip_it_timed(lab: Lab) -> None:
    # A small stream window stands in for a long fat path at this lab's 40 ms:
    # the nominal gigabit's BDP then needs more than the default 4 streams.
    script = str(Path(__file__).with_name("mesh_peer.py"))
    window = 512 << 10
    where = f"{lab.spec.addr(2)}:5301"
    ready, done = lab.file("meshpeer.ready"), lab.file("meshpeer.done")
    ready.unlink(missing_ok=True)
    done.unlink(missing_ok=True)
    listener = lab.popen(2, sys.executable, script, "listen", where, str(ready), str(done),
                         stdout=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert listener.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        dialled = json.loads(
            subprocess.run(
                lab.cmd(0, sys.executable, script, "dial", where, str(window), str(done)),
                capture_output=True, text=True, env=child_env(), timeout=40, check=True,
            ).stdout
        )  # fmt: skip
        accepted = json.loads(listener.communicate(timeout=20)[0])
    finally:
        listener.kill()
        listener.wait()
    rtt_s = dialled["dial_rtt_s"]
    # The kernel's smoothed RTT over the TLS handshake also holds the time the
    # user-space delay line and the listener wait for one of CI's 2 busy cores
    # (47 ms once); twice the lab's RTT (the whole handshake timed) still fails.
    assert RTT <= rtt_s <= RTT * 1.5
    k = connections_for(None, lab.spec.addr(2), window, rtt_s=rtt_s)
    assert k > UNKNOWN_LINK_CONNECTIONS
    assert dialled["k"] == accepted["k"] == k
