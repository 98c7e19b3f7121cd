"""Churn: real daemons killed (-9), frozen (SIGSTOP), added and restarted under load.

A chaos run (``collnet_lab.chaos``) checks every completed all-reduce
against numpy over exactly the peers that took part and across those peers
(bit-identical), times every failure from the kill or freeze that caused it,
and counts calls that ran into their deadline (hangs) or waited with no
disturbance to explain it (stalls). The short run is part of the quick CI
run; the 60 s run of the issue's bar is marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from collnet_lab.chaos import (
    FREEZE_DETECT_BOUND_S,
    KILL_DETECT_BOUND_S,
    ChaosConfig,
    ChaosRun,
    check_result,
    parse_duration,
    peer_input,
)

REQUIRED_KEYS = {"completed", "failed", "killed", "joined", "max_detect_s", "divergent", "hangs"}


def _run(cfg: ChaosConfig) -> tuple[dict[str, Any], ChaosRun]:
    run = ChaosRun(cfg)
    summary = run.run()
    # stop() reaped everything this run started, killed and frozen daemons included.
    assert run.cluster is not None
    procs = [d.proc for d in run.cluster.daemons] + [run.cluster.coordinator]
    alive = [p.pid for p in procs if p is not None and p.poll() is None]
    assert not alive, f"processes outlived the chaos run: {alive}"
    assert all(n.trainer is None or not n.trainer.is_alive() for n in run.nodes)
    return summary, run


def _explain(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=1)


def _assert_invariants(s: dict[str, Any]) -> None:
    why = _explain(s)
    assert s["divergent"] == 0, why
    assert s["divergent_states"] == 0, why
    assert s["hangs"] == 0, why
    assert s["stalls"] == 0, why
    assert s["bugs"] == 0, why
    assert s["anomalies"] == 0, why
    assert s["max_detect_s"] <= KILL_DETECT_BOUND_S, why
    assert s["max_detect_freeze_s"] <= FREEZE_DETECT_BOUND_S, why
    assert s["ok"], why


# -- the pieces, without processes ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("2m", 120.0), ("500ms", 0.5), ("1.5", 1.5), (" 3 s ", 3.0), ("1h", 3600.0)],
)
def test_durations_parse_with_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "s", "3 days", "-1s", "1e3s"])
def test_bad_durations_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(bad)


def test_round_inputs_are_deterministic_and_differ_by_peer_and_round() -> None:
    a = peer_input(1, "peer00", 3, 4, 1024, "none")
    assert np.array_equal(a, peer_input(1, "peer00", 3, 4, 1024, "none"))
    assert not np.array_equal(a, peer_input(1, "peer01", 3, 4, 1024, "none"))
    assert not np.array_equal(a, peer_input(1, "peer00", 3, 5, 1024, "none"))
    assert np.all(a[:512] == np.round(a[:512]))  # the exact half holds integers


def _reduce(peers: list[str], codec: str = "none") -> tuple[np.ndarray, np.ndarray]:
    inputs = [peer_input(7, p, 2, 9, 4096, codec) for p in peers]
    ref = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    res = np.zeros(4096, np.float32)
    for x in inputs:  # float32 accumulation, as a ring does
        res += x
    return res, ref


def test_check_result_accepts_a_float32_sum_and_rejects_a_missing_peer() -> None:
    peers = ["peer00", "peer01", "peer02", "peer03"]
    res, ref = _reduce(peers)
    res[0] = 0.0  # the stop-vote slot
    assert check_result(res, ref, len(peers), "none") is None
    partial, _ = _reduce(peers[:3])
    partial[0] = 0.0
    assert "integer half differs" in (check_result(partial, ref, len(peers), "none") or "")


def test_check_result_rejects_a_bad_stop_vote_and_an_out_of_bound_quantized_result() -> None:
    res, ref = _reduce(["peer00", "peer01"])
    res[0] = 0.5
    assert "stop-vote" in (check_result(res, ref, 2, "none") or "")
    q, qref = _reduce(["peer00", "peer01"], "uint8")
    assert check_result(q, qref, 2, "uint8") is None
    q[10] += 1.0
    assert "uint8 error" in (check_result(q, qref, 2, "uint8") or "")


# -- real processes ------------------------------------------------------------


@pytest.mark.timeout(180)
def test_short_churn_run_has_no_divergence_no_hang_and_bounded_detection(
    tmp_path: Path,
) -> None:
    """4 peers, 15 s, a disturbance every ~3 s: kill -9, SIGSTOP, joins, restarts."""
    cfg = ChaosConfig(peers=4, duration_s=15.0, seed=1, kill_every_s=3.0, workdir=tmp_path)
    s, _ = _run(cfg)
    _assert_invariants(s)
    why = _explain(s)
    assert s["completed"] >= 50, why
    assert s["killed"] >= 1, why
    assert s["joined"] >= 1, why
    # Every completed round began with a sync, and joiners fetched real bytes.
    assert s["syncs"] >= s["completed"], why
    assert s["sync_fetched_bytes"] >= cfg.state_bytes, why


@pytest.mark.timeout(120)
def test_cli_chaos_json_prints_one_object_with_the_summary_keys(tmp_path: Path) -> None:
    args = ["chaos", "--peers", "3", "--duration", "8s", "--seed", "5", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "collnet_daemon", *args],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    summary = json.loads(lines[0])
    assert summary.keys() >= REQUIRED_KEYS, summary
    assert proc.returncode == 0, _explain(summary) + proc.stderr[-3000:]
    assert summary["divergent"] == 0 and summary["hangs"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sixty_second_churn_run_of_six_peers_meets_the_bar(tmp_path: Path) -> None:
    """The issue's bar: 6 peers, 60 s, a disturbance every ~3 s."""
    cfg = ChaosConfig(peers=6, duration_s=60.0, seed=7, kill_every_s=3.0, workdir=tmp_path)
    s, _ = _run(cfg)
    _assert_invariants(s)
    why = _explain(s)
    assert s["completed"] >= 200, why
    assert s["killed"] >= 5, why
    assert s["joined"] >= 2, why
    assert s["syncs"] >= s["completed"], why
