"""One side of a real data link across a lab, run inside a host's namespace.

``listen ADDR READY``: a Mesh ("z", auto K) that prints, as JSON, the K of
the first link dialled to it. ``dial ADDR WINDOW``: a Mesh ("a", auto K,
streams of WINDOW bytes) that dials "z" at ADDR and prints its link's K and
the round trip its first connection timed. Both share a secret, as peers
off loopback must.
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


async def _listen(host: str, port: int, ready: Path) -> dict[str, Any]:
    mesh = Mesh("z", None, RecordingRouter(), connect_timeout_s=20.0, secret=SECRET)
    try:
        await mesh.listen(host, port)
        ready.touch()
        link = await mesh.get_link("a", (host, 1))
        return {"k": link.k}
    finally:
        await mesh.close()


async def _dial(host: str, port: int, window: int) -> dict[str, Any]:
    mesh = Mesh("a", None, RecordingRouter(), connect_timeout_s=20.0, secret=SECRET)
    mesh.window_bytes = window
    try:
        link = await mesh.get_link("z", (host, port))
        return {"k": link.k, "dial_rtt_s": link.dial_rtt_s}
    finally:
        await mesh.close()


def main() -> None:
    mode, where = sys.argv[1], sys.argv[2]
    host, port = where.rsplit(":", 1)
    if mode == "listen":
        out = asyncio.run(_listen(host, int(port), Path(sys.argv[3])))
    else:
        out = asyncio.run(_dial(host, int(port), int(sys.argv[3])))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
