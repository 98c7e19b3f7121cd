"""Metrics and ``collnet status`` on a real cluster: the numbers are live and move.

Every daemon and the coordinator serve Prometheus text on ``--metrics-port 0``
(the bound address comes back in their ready files); the tests scrape them
over HTTP with urllib as Prometheus would, run collectives through the SDK
and check what changed. ``collnet status`` runs as a user would run it.
"""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import (
    CALL_TIMEOUT_S,
    Peers,
    fresh_tag,
    run_on_all,
    run_on_all_outcomes,
    running_peers,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from collnet.errors import InvalidArgument

METRICS = ["--metrics-port", "0"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(addr: str) -> Samples:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``{label value: sample}`` of every ``name`` sample carrying ``label``."""
    out = {}
    for (sname, labels), v in samples.items():
        d = dict(labels)
        if sname == name and label in d:
            out[d[label]] = v
    return out


def _ring_inputs(peers: Peers, n: int) -> list[np.ndarray]:
    return [np.full(n, rank + 1, np.float32) for rank in range(peers.size)]


@pytest.mark.timeout(120)
def test_daemon_metrics_count_traffic_latency_and_failures_as_collectives_run(
    tmp_path: Path,
) -> None:
    with running_peers(3, tmp_path, extra_args=METRICS, coordinator_args=METRICS) as p:
        daemons = p.cluster.daemons
        assert all(d.metrics for d in daemons)
        before = [scrape(d.metrics) for d in daemons]

        big = _ring_inputs(p, 3 << 20)  # 12 MiB: ring, pieces large enough to meter
        for _ in range(2):
            out = p.all_reduce(big, algo="ring")
            assert float(out[0][0]) == 6.0
        p.all_reduce(_ring_inputs(p, 1024))  # small: auto picks the star
        p.all_reduce(_ring_inputs(p, 1 << 20), codec="uint8", algo="ring")
        tag = fresh_tag()
        outcomes = run_on_all_outcomes(
            p.comms,
            lambda _r, c: c.all_reduce(
                np.ones(64, np.float32), codec="no-such-codec", tag=tag, timeout_s=CALL_TIMEOUT_S
            ),
        )
        assert all(isinstance(o, InvalidArgument) for o in outcomes), outcomes

        after = [scrape(d.metrics) for d in daemons]
        epoch = p.comms[0].epoch
        for me, (b, a) in enumerate(zip(before, after, strict=True)):
            others = [d.peer_id for d in daemons if d is not daemons[me]]
            for name in ("collnet_peer_sent_bytes_total", "collnet_peer_received_bytes_total"):
                grown = {
                    peer: labelled(a, name, "peer").get(peer, 0)
                    - labelled(b, name, "peer").get(peer, 0)
                    for peer in others
                }
                # The ring moves data both ways around the world; control traffic alone
                # (heartbeats, tens of bytes) is far below a megabyte.
                assert sum(grown.values()) > 2 * (12 << 20) * 2 / 3, (me, name, grown)
                assert all(v > 0 for v in grown.values()), (me, name, grown)

            def count(s: Samples, algo: str, codec: str) -> float:
                return value(
                    s,
                    "collnet_collective_duration_seconds_count",
                    op="all_reduce",
                    algo=algo,
                    codec=codec,
                )

            assert count(a, "ring", "none") - count(b, "ring", "none") == 2
            assert count(a, "star", "none") - count(b, "star", "none") == 1
            assert count(a, "ring", "uint8") - count(b, "ring", "uint8") == 1
            ring_s = value(
                a,
                "collnet_collective_duration_seconds_sum",
                op="all_reduce",
                algo="ring",
                codec="none",
            )
            assert ring_s > 0
            assert value(
                a, "collnet_collective_bytes_total", op="all_reduce", algo="ring", codec="none"
            ) == 2 * (12 << 20)
            failed = value(a, "collnet_failures_total", op="all_reduce", kind="InvalidArgument")
            assert (
                failed - value(b, "collnet_failures_total", op="all_reduce", kind="InvalidArgument")
                == 1
            )
            assert (
                value(a, "collnet_requests_total", op="all_reduce")
                - value(b, "collnet_requests_total", op="all_reduce")
                == 5
            )
            waited = value(a, "collnet_request_duration_seconds_count", op="all_reduce")
            assert waited - value(b, "collnet_request_duration_seconds_count", op="all_reduce") == 5
            assert value(a, "collnet_request_duration_seconds_count", op="update_topology") == 1
            assert value(a, "collnet_epoch") == epoch
            assert value(a, "collnet_world_size") == 3
            assert value(a, "collnet_member") == 1
            assert value(a, "collnet_coordinator_connected") == 1
            assert labelled(a, "collnet_link_up", "peer") == dict.fromkeys(others, 1.0)

        # Large pieces flowed over the ring's links: each daemon measured the link
        # from its ring predecessor.
        measured = [labelled(a, "collnet_link_bandwidth_bytes_per_second", "peer") for a in after]
        assert all(measured) and all(v > 0 for m in measured for v in m.values()), measured

        # Heartbeats (every 0.5 s) measure RTTs on every data and control link.
        def rtts_known() -> bool:
            now = [scrape(d.metrics) for d in daemons]
            return all(
                len(labelled(s, "collnet_link_rtt_seconds", "peer")) == 2
                and value(s, "collnet_coordinator_rtt_seconds") > 0
                for s in now
            )

        wait_until(rtts_known, 20.0, "RTT samples on every link")

        coord = scrape(p.cluster.coordinator_metrics)
        assert value(coord, "collnet_coordinator_epoch") == epoch
        assert value(coord, "collnet_coordinator_world_size") == 3
        assert value(coord, "collnet_coordinator_pending_peers") == 0
        assert value(coord, "collnet_coordinator_control_connections") == 3


@pytest.mark.timeout(120)
def test_a_state_sync_from_several_holders_leaves_the_fetchers_link_meters_alone(
    tmp_path: Path,
) -> None:
    """A fetch striped over two holders shares the fetcher's own link: its meters
    must not read a share of it as each link's rate (the next epoch's plan would
    take it for the link). The same links one at a time (a ring) are measured."""
    n = (32 << 20) // 4
    args = [*METRICS, "--link-report-s", "0"]  # no probes: only this traffic is metered
    with running_peers(3, tmp_path, extra_args=args) as p:
        fetcher = p.cluster.daemons[0]
        states = []
        for index, comm in enumerate(p.comms):
            arr = comm.empty(n, np.float32)
            arr.fill(0.0 if index == 0 else 7.0)
            states.append({"w": arr})
        results = run_on_all(
            p.comms, lambda r, c: c.sync_state(states[r], 1, timeout_s=CALL_TIMEOUT_S)
        )
        assert results[0].bytes_fetched == 4 * n and len(results[0].sources) == 2
        assert all(r.in_parity for r in results) and float(states[0]["w"][-1]) == 7.0
        bandwidth = "collnet_link_bandwidth_bytes_per_second"
        assert labelled(scrape(fetcher.metrics), bandwidth, "peer") == {}

        p.all_reduce(_ring_inputs(p, n), algo="ring")
        measured = labelled(scrape(fetcher.metrics), bandwidth, "peer")
        assert len(measured) == 1 and all(v > 0 for v in measured.values()), measured


@pytest.mark.timeout(60)
def test_metrics_endpoint_refuses_other_paths_and_methods(tmp_path: Path) -> None:
    with running_peers(1, tmp_path, extra_args=METRICS) as p:
        addr = p.cluster.daemons[0].metrics
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{addr}/nope", timeout=10)
        assert missing.value.code == 404
        post = urllib.request.Request(f"http://{addr}/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=10)
        assert refused.value.code == 405
        assert value(scrape(addr), "collnet_world_size") == 1  # and it still serves


def _status(coordinator: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collnet_daemon", "status", "--coordinator", coordinator, *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.timeout(90)
def test_collnet_status_shows_members_pending_peers_revisions_and_control_rtts(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.key"
    secret.write_text(secrets.token_hex(32) + "\n")
    with running_peers(2, tmp_path / "c", secret_file=secret) as p:
        # Peer 1 holds a newer revision: the sync brings peer 0 to it.
        states = [{"w": np.full(1000, float(rank), np.float32)} for rank in range(2)]
        synced = run_on_all(
            p.comms, lambda r, c: c.sync_state(states[r], 6 + r, timeout_s=CALL_TIMEOUT_S)
        )
        assert all(res.in_parity and res.revision == 7 for res in synced)
        joiner = p.cluster.add_daemon()  # registered, not admitted yet
        addr = p.cluster.coordinator_addr

        def answer() -> dict[str, object]:
            proc = _status(addr, "--secret-file", str(secret), "--json")
            assert proc.returncode == 0, proc.stderr
            result: dict[str, object] = json.loads(proc.stdout)
            return result

        status = answer()
        assert status["epoch"] == p.comms[0].epoch
        rows = {row["id"]: row for row in status["peers"]}  # type: ignore[attr-defined]
        members = [d.peer_id for d in p.cluster.daemons[:2]]
        assert [rows[m]["state"] for m in members] == ["active", "active"]
        assert sorted(rows[m]["rank"] for m in members) == [0, 1]
        assert rows[joiner.peer_id]["state"] == "pending"
        assert rows[joiner.peer_id]["rank"] is None
        assert all(r["connected"] for r in rows.values())
        assert rows[members[0]]["data"] == p.cluster.daemons[0].data
        for m in members:
            assert rows[m]["revision"] == 7
            assert rows[m]["state_digest"] == synced[0].state_digest
        assert "revision" not in rows[joiner.peer_id]

        # Control-connection RTTs come from the coordinator's heartbeats.
        wait_until(
            lambda: all(r["rtt_s"] for r in answer()["peers"]),  # type: ignore[attr-defined]
            20.0,
            "RTTs of every control connection",
        )

        table = _status(addr, "--secret-file", str(secret))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert f"epoch {status['epoch']}" in lines[0] and "world size 2" in lines[0]
        assert "PEER" in lines[1] and "RTT" in lines[1]
        peer_rows = itertools.takewhile(bool, lines[2:])  # the link matrix follows a blank line
        by_peer = {line.split()[1]: line for line in peer_rows}
        assert "active" in by_peer[members[0]] and "pending" in by_peer[joiner.peer_id]
        assert by_peer[members[0]].split()[-2:] == ["7", synced[0].state_digest[:16]]

        # The status is for holders of the secret only.
        wrong = tmp_path / "wrong.key"
        wrong.write_text(secrets.token_hex(32) + "\n")
        refused = _status(addr, "--secret-file", str(wrong))
        assert refused.returncode == 1
        assert "secret" in refused.stderr
        # Looking did not disturb the world.
        assert p.sync_world()[0].size == 3  # the joiner is admitted as usual
