"""The verdict of a chaos run: its summary (the ``--json`` keys) and the table.

``summary["ok"]`` holds when no round diverged (result or state), no call hung
or stalled, and the run saw no bug and no anomaly.
"""

from __future__ import annotations

from typing import Any

from collnet_lab.chaos.config import FREEZE_DETECT_BOUND_S, KILL_DETECT_BOUND_S, ChaosConfig
from collnet_lab.chaos.recorder import Recorder


def summarize(
    rec: Recorder,
    cfg: ChaosConfig,
    seed: int,
    peers_final: int,
    duration_s: float,
    logs: str | None,
) -> dict[str, Any]:
    """The run's summary; ``logs`` (the cluster's folder) is named when failed or kept."""
    rounds = rec.rounds.values()
    completed = sum(1 for r in rounds if r.hashes)
    split = sum(1 for r in rounds if r.hashes and r.failed)
    kill = rec.detect["kill"]
    freeze = rec.detect["freeze"]
    max_detect = max(kill, default=0.0)
    max_freeze = max(freeze, default=0.0)
    divergent_states = len(rec.state_divergences)
    divergent = sum(1 for r in rounds if r.divergent) + divergent_states
    summary: dict[str, Any] = {
        "completed": completed,
        "completed_calls": rec.completed_calls,
        "failed": rec.failed,
        "failed_collectives": sum(1 for r in rounds if r.failed),
        "split": split,
        "killed": rec.actions["kill"] + rec.actions["freeze_then_kill"],
        "frozen": rec.actions["freeze"],
        "resumed": rec.actions["freeze_then_resume"],
        "added": rec.actions["join"],
        "restarted": rec.actions["restart"],
        "joined": rec.joined,
        "max_detect_s": round(max_detect, 4),
        "max_detect_freeze_s": round(max_freeze, 4),
        "detect_bound_s": KILL_DETECT_BOUND_S,
        "freeze_detect_bound_s": FREEZE_DETECT_BOUND_S,
        "divergent": divergent,
        "divergent_states": divergent_states,
        "syncs": len(rec.syncs),
        "sync_calls": rec.synced_calls,
        "sync_fetched_bytes": rec.fetched_bytes,
        "hangs": len(rec.hangs),
        "stalls": len(rec.stalls),
        "max_call_s": {k: round(v, 3) for k, v in sorted(rec.max_call_s.items())},
        "errors_by_kind": dict(rec.errors_by_kind),
        "unattributed_failures": len(rec.unattributed),
        "failed_at_end": rec.failed_at_end,
        "victim_errors": dict(rec.victim_errors),
        "bugs": len(rec.bugs),
        "anomalies": len(rec.anomalies),
        "peers": cfg.peers,
        "peers_final": peers_final,
        "duration_s": round(duration_s, 2),
        "seed": seed,
        "bytes": cfg.nbytes,
        "state_bytes": cfg.state_bytes,
    }
    details = {
        "hang_details": rec.hangs,
        "stall_details": rec.stalls,
        "divergence_details": rec.divergences + rec.state_divergences,
        "bug_details": rec.bugs,
        "anomaly_details": rec.anomalies,
        "unattributed_details": rec.unattributed,
    }
    summary.update({k: v[:10] for k, v in details.items() if v})
    summary["ok"] = not (divergent or rec.hangs or rec.stalls or rec.bugs or rec.anomalies)
    if not summary["ok"] or cfg.keep_logs:
        summary["logs"] = logs
    return summary


def _fmt_calls(max_call_s: dict[str, float]) -> str:
    return ", ".join(f"{op} {t:.2f} s" for op, t in max_call_s.items()) or "-"


def print_table(s: dict[str, Any]) -> None:
    mib = s["bytes"] / 2**20
    print(
        f"collnet chaos: {s['peers']} peers, {s['duration_s']:.1f} s, seed {s['seed']}, "
        f"{mib:g} MiB float32 all-reduces, loopback"
    )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_kind"].items())) or "-"
    rows = [
        ("collectives completed", f"{s['completed']} ({s['completed_calls']} calls)"),
        ("failed calls (typed)", f"{s['failed']} ({kinds})"),
        ("  split rounds", f"{s['split']} (completed on some members, failed on others)"),
        ("  unattributed", str(s["unattributed_failures"])),
        ("  during the stop", str(s["failed_at_end"])),
        ("killed (kill -9)", str(s["killed"])),
        ("frozen (SIGSTOP)", f"{s['frozen']} ({s['resumed']} resumed)"),
        ("added / restarted", f"{s['added']} / {s['restarted']}"),
        ("joined (admitted)", str(s["joined"])),
        ("max detect, kill -9", f"{s['max_detect_s']:.3f} s (bound {s['detect_bound_s']:g} s)"),
        (
            "max detect, SIGSTOP",
            f"{s['max_detect_freeze_s']:.3f} s (bound {s['freeze_detect_bound_s']:g} s)",
        ),
        ("divergent", str(s["divergent"])),
        ("hangs", str(s["hangs"])),
        ("stalls", f"{s['stalls']} (max call {_fmt_calls(s['max_call_s'])})"),
        ("bugs / anomalies", f"{s['bugs']} / {s['anomalies']}"),
        ("peers at the end", str(s["peers_final"])),
        (
            "state syncs",
            f"{s['syncs']} ({s['sync_calls']} calls, {s['sync_fetched_bytes'] / 2**20:.1f} MiB "
            f"fetched, {s['divergent_states']} divergent)",
        ),
    ]
    for name, value in rows:
        print(f"  {name:<22} {value}")
    for key in (
        "hang_details",
        "stall_details",
        "divergence_details",
        "bug_details",
        "anomaly_details",
    ):
        for line in s.get(key, []):
            print(f"  ! {line}")
    if s.get("logs"):
        print(f"  logs: {s['logs']}")
    print("result:", "OK" if s["ok"] else "FAILED")
