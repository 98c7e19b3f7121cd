"""Local API requests beyond the core ones: cancel, and an in-daemon benchmark.

``cancel`` aborts one collective on every peer: the caller's handle and every
other participant get ``CollectiveAborted``. ``bench_all_reduce`` runs the
very same all-reduce path a trainer's request takes, on a buffer the daemon
allocates itself, timed inside the daemon: the baseline against which
``bench/sdk_overhead.py`` measures what the SDK (IPC round trip, shared
memory) adds.
"""

from __future__ import annotations

import time
from typing import Any, Final

import numpy as np

from collnet.algo.ops import DTYPE_BY_NAME
from collnet.errors import CollectiveAborted
from collnet.transport.shm import SharedBuffer
from collnet.wire.localapi import AllReduce, BenchAllReduce, Cancel
from collnet_daemon.allreduce import AllReduces
from collnet_daemon.buffers import SharedBuffers
from collnet_daemon.executor import Executor


def cancel(executor: Executor, req: Cancel) -> dict[str, Any]:
    """Abort collective ``(epoch, tag)`` here and on every peer taking part."""
    exc = CollectiveAborted(
        f"collective {(req.epoch, req.tag)} cancelled by a trainer on {executor.me}",
        epoch=req.epoch,
        tag=req.tag,
        peer=executor.me,
    )
    return {"cancelled": executor.cancel((req.epoch, req.tag), exc)}


# Elements of the bench's barrier: one or more in every rank's segment for
# worlds up to this size, so that every rank waits for results from all the
# others (the owner of the only segment would leave a hop before them).
BARRIER_COUNT: Final = 256


async def bench_all_reduce(
    all_reduces: AllReduces, buffers: SharedBuffers, epoch: int, req: BenchAllReduce
) -> dict[str, Any]:
    """Run ``iters`` all-reduces of ``count`` elements on a daemon-owned buffer; their times.

    Each timed all-reduce goes through ``AllReduces.run`` exactly as a
    trainer's would. With ``barrier`` a small direct all-reduce precedes each,
    so a time covers the collective rather than the peers' skew: every rank
    leaves it on the last of the results it receives from every other rank,
    so all leave together (a star's root would leave one hop before the
    others, and that hop would be charged to the timed collective).
    """
    dtype = DTYPE_BY_NAME[req.dtype]
    seg = SharedBuffer.create(req.count * dtype.itemsize)
    flag = SharedBuffer.create(4 * BARRIER_COUNT)
    buffers.adopt(seg)
    buffers.adopt(flag)
    epoch = req.epoch if req.epoch is not None else epoch
    try:
        seg.array(dtype, req.count).fill(1)
        flag.array(np.float32, BARRIER_COUNT).fill(1)
        times = []
        for i in range(req.iters):
            if req.barrier:
                tiny = AllReduce(
                    tag=f"{req.tag}-b{i}",
                    shm=flag.name,
                    count=BARRIER_COUNT,
                    dtype="float32",
                    algo="direct",
                    epoch=epoch,
                    timeout_s=req.timeout_s,
                )
                await all_reduces.run(tiny)
            started = time.perf_counter()
            await all_reduces.run(
                AllReduce(
                    tag=f"{req.tag}-{i}",
                    shm=seg.name,
                    count=req.count,
                    dtype=dtype.name,
                    reduction=req.reduction,
                    codec=req.codec,
                    algo=req.algo,
                    epoch=epoch,
                    timeout_s=req.timeout_s,
                )
            )
            times.append(time.perf_counter() - started)
    finally:
        buffers.forget(seg)
        buffers.forget(flag)
    return {"times_s": times}
