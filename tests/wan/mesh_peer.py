"""One side of a real data link across a lab, run inside a host's namespace.

``listen ADDR READY DONE``: a Mesh ("z", auto K) that prints, as JSON, the
K of the first link dialled to it, and touches DONE once that link is ready.
``dial ADDR WINDOW DONE``: a Mesh ("a", auto K, streams of WINDOW bytes) that
dials "z" at ADDR and prints its link's K and the round trip its first
connection timed. Both share a secret, as peers off loopback must.

The dialler holds its link open until DONE: its side can be ready while the
listener has not yet taken every connection, and closing then would fail the
listener's link half made.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from collnet.transport.mesh import Mesh

# The unit tests' router, from this script's own checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from recording_router import RecordingRouter

SECRET = b"mesh-peer-test-secret-0123456789"


async def _listen(host: str, port: int, ready: Path, done: Path) -> dict[str, Any]:
    mesh = Mesh("z", None, RecordingRouter(), connect_timeout_s=20.0, secret=SECRET)
    try:
        await mesh.listen(host, port)
        ready.touch()
        link = await mesh.get_link("a", (host, 1))
        done.touch()
        return {"k": link.k}
    finally:
        await mesh.close()


async def _dial(host: str, port: int, window: int, done: Path) -> dict[str, Any]:
    mesh = Mesh("a", None, RecordingRouter(), connect_timeout_s=20.0, secret=SECRET)
    mesh.window_bytes = window
    try:
        link = await mesh.get_link("z", (host, port))
        deadline = asyncio.get_running_loop().time() + 20.0
        while not done.exists() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return {"k": link.k, "dial_rtt_s": link.dial_rtt_s}
    finally:
        await mesh.close()


def main() -> None:
    mode, where = sys.argv[1], sys.argv[2]
    host, port = where.rsplit(":", 1)
    if mode == "listen":
        out = asyncio.run(_listen(host, int(port), Path(sys.argv[3]), Path(sys.argv[4])))
    else:
        out = asyncio.run(_dial(host, int(port), int(sys.argv[3]), Path(sys.argv[4])))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
