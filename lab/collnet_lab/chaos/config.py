"""The settings of a chaos run and the bounds its checks hold the daemons to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Detection bounds with the default heartbeat settings (floor 2 s): kill -9 is
# seen through socket errors; a frozen peer only through heartbeat silence.
KILL_DETECT_BOUND_S = 3.0
FREEZE_DETECT_BOUND_S = 6.0

# How long a split barrier (see ChaosRun._monitor in driver.py) may last before it is a stall.
SPLIT_S = 2.0

# A failure that names no disturbed peer is blamed on the latest disturbance
# at most this long before it; otherwise it is "unattributed".
BLAME_WINDOW_S = 10.0

_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: "60s", "2m", "500ms", "1.5h" or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"bad duration {text!r} (e.g. 60s, 2m, 500ms)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


@dataclass
class ChaosConfig:
    peers: int = 6
    duration_s: float = 60.0
    seed: int | None = None
    kill_every_s: float = 3.0
    nbytes: int = 1 << 20
    # Size of each trainer's shared state (synced every round).
    state_bytes: int = 4 << 20
    # Per-call deadline of every update_topology and all-reduce: a call that
    # runs into it is a hang.
    call_timeout_s: float = 20.0
    # A call of an undisturbed trainer that takes longer than this is a stall:
    # a wait no disturbance explains (a frozen peer is declared dead within
    # the freeze bound), which only the next membership change ended.
    stall_s: float = 8.0
    connections: int = 2
    # Every fourth round all-reduces in uint8 (bit-identity plus an error bound).
    quantized: bool = True
    min_live: int = 2
    # Most daemons alive at once (default: peers + 2).
    max_peers: int | None = None
    workdir: Path | None = None
    # Keep the cluster's logs (and this run's event log); also kept on failure.
    keep_logs: bool = False
    log_level: str = "warning"
    # Log every round of every trainer to the event log (large).
    trace: bool = False
