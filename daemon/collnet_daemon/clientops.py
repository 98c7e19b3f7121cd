"""Local API requests for the SDK beyond the core ones: cancel, and an in-daemon benchmark.

``cancel`` aborts one collective on every peer: the caller's handle and every
other participant get ``CollectiveAborted``. ``bench_all_reduce`` runs the
very same all-reduce path a trainer's request takes, on a buffer the daemon
allocates itself, timed inside the daemon: the baseline against which
``bench/sdk_overhead.py`` measures what the SDK (IPC round trip, shared
memory) adds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from collnet.algo.ops import DTYPE_BY_NAME
from collnet.errors import CollectiveAborted, InvalidArgument
from collnet.transport.shm import SharedBuffer

if TYPE_CHECKING:
    from collnet_daemon.service import Daemon

MAX_BENCH_ITERS = 1000


def _tag(req: dict[str, Any]) -> int | str:
    tag = req.get("tag")
    if not isinstance(tag, int | str) or isinstance(tag, bool):
        raise InvalidArgument(f"{req.get('op')} needs an int or str 'tag'")
    return tag


def _int(req: dict[str, Any], name: str, default: int | None = None) -> int:
    value = req.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"field {name!r} must be int, got {value!r:.40}")
    return value


def cancel(daemon: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """Abort collective ``(epoch, tag)`` here and on every peer taking part."""
    epoch, tag = _int(req, "epoch"), _tag(req)
    key = (epoch, tag)
    exc = CollectiveAborted(
        f"collective {key} cancelled by a trainer on {daemon.id}",
        epoch=epoch,
        tag=tag,
        peer=daemon.id,
    )
    run = daemon.router.runs.get(key)
    if run is not None:
        daemon.router.abort_everywhere(run, exc)
        return {"cancelled": True}
    if key in daemon.router.failed:
        return {"cancelled": False}
    # Not registered here yet (still linking up): it fails the moment it starts,
    # and the peers already running it are told now.
    daemon.router.failed[key] = exc
    world = daemon.worlds.get(epoch)
    if world is not None:
        daemon._abort_remote(key, world, exc)
    return {"cancelled": True}


async def bench_all_reduce(daemon: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """Run ``iters`` all-reduces of ``count`` elements on a daemon-owned buffer; their times.

    Each timed all-reduce goes through ``Daemon.all_reduce`` exactly as a
    trainer's would. With ``barrier`` a one-element star all-reduce precedes
    each, so a time covers the collective rather than the peers' skew.
    """
    count, iters = _int(req, "count"), _int(req, "iters", 5)
    if count < 1 or not 1 <= iters <= MAX_BENCH_ITERS:
        raise InvalidArgument("bench_all_reduce: need count >= 1 and 1 <= iters <= 1000")
    dtype = DTYPE_BY_NAME.get(str(req.get("dtype", "float32")))
    if dtype is None:
        raise InvalidArgument(f"unsupported dtype {req.get('dtype')!r}")
    prefix = _tag(req)
    barrier = bool(req.get("barrier", True))
    seg = SharedBuffer.create(count * dtype.itemsize)
    flag = SharedBuffer.create(4)
    daemon.buffers[seg.name], daemon.buffers[flag.name] = seg, flag
    try:
        seg.array(dtype, count).fill(1)
        flag.array(np.float32, 1).fill(1)
        base = {k: v for k, v in req.items() if k in ("reduce", "codec", "algo", "timeout_s")}
        base.update(op="all_reduce", epoch=_int(req, "epoch", daemon.world.epoch))
        times = []
        for i in range(iters):
            if barrier:
                tiny = dict(base, shm=flag.name, count=1, dtype="float32", algo="star")
                tiny.update(codec="none", reduce="sum", tag=f"{prefix}-b{i}")
                await daemon.all_reduce(tiny)
            started = time.perf_counter()
            await daemon.all_reduce(
                dict(base, shm=seg.name, count=count, dtype=dtype.name, tag=f"{prefix}-{i}")
            )
            times.append(time.perf_counter() - started)
    finally:
        for buf in (seg, flag):
            daemon.buffers.pop(buf.name, None)
            buf.close()
    return {"times_s": times}
