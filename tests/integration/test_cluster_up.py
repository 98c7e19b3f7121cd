"""``collnet up``: the one-command demo cluster, run as a user would run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CODECS = ["none", "fp16", "bf16", "uint8", "uint4"]


def _collnet() -> list[str]:
    script = Path(sys.executable).with_name("collnet")
    if script.exists():
        return [str(script)]
    found = shutil.which("collnet")
    assert found, "the collnet console script is not installed (pip install -e .)"
    return [found]


@pytest.mark.timeout(120)
def test_collnet_up_json_reports_ok_bit_identical_results_for_every_codec(tmp_path: Path) -> None:
    # The demo's cluster lives under TMPDIR, so its processes can be found afterwards.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [*_collnet(), "up", "--peers", "3", "--size", "1MiB", "--iters", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line, got:\n{proc.stdout}"
    summary = json.loads(lines[0])
    assert summary["ok"] is True
    assert summary["bit_identical"] is True
    assert summary["peers"] == 3 and summary["bytes"] == 1 << 20
    assert sorted(summary["codecs"]) == sorted(CODECS)
    for codec, row in summary["codecs"].items():
        assert row["busbw"] > 0, codec
        assert row["bit_identical"] is True, codec
        err = row["max_abs_error"]
        assert err is not None and err <= row["error_bound"], codec
    assert summary["codecs"]["none"]["max_abs_error"] < 1e-5

    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"collnet up left processes behind: {leftover.stdout}"
