"""Another local user the security tests act as (made by conftest.py's ``other_user``)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OtherUser:
    """An unprivileged local user, and how to run a probe as it."""

    name: str
    uid: int
    gid: int
    python: str
    libdir: Path  # probe.py, pyzmq and msgpack, readable by that user

    def probe(self, *steps: dict[str, Any], timeout_s: float = 30.0) -> list[Any]:
        """Run ``steps`` (see probe.py) as this user; the result of each step."""
        cmd = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            self.python,
            str(self.libdir / "probe.py"),
            json.dumps(list(steps)),
        ]
        env = {"PYTHONPATH": str(self.libdir), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
        done = subprocess.run(
            cmd, env=env, capture_output=True, timeout=timeout_s, check=False, cwd="/"
        )
        assert done.returncode == 0, f"probe failed: {done.stderr.decode(errors='replace')}"
        out: list[Any] = json.loads(done.stdout)
        return out
