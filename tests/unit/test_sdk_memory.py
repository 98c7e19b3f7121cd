"""The SDK's shared memory: every segment it makes is unlinked by close, also
one asked for while another thread closes it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from collnet_client.memory import SharedMemory

from collnet.errors import DaemonUnavailable


def ours() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"collnet-{os.getpid()}-*")}


def test_close_unlinks_arrays_and_staging_lent_or_pooled() -> None:
    before = ours()
    memory = SharedMemory()
    arr = memory.empty(16)
    lent = memory.stage(64)
    pooled = memory.stage(32)
    memory.unstage(pooled)
    assert memory.stage(8)[0] is pooled[0]  # a pooled segment is lent again
    assert len(ours() - before) == 3
    memory.close()
    assert ours() == before
    del arr, lent, pooled


def test_a_closed_memory_makes_no_segment() -> None:
    before = ours()
    memory = SharedMemory()
    memory.close()
    with pytest.raises(DaemonUnavailable):
        memory.stage(64)
    with pytest.raises(DaemonUnavailable):
        memory.empty(4, np.float64)
    assert ours() == before


def stage_until_closed(
    memory: SharedMemory, go: threading.Barrier, refused: list[Exception]
) -> None:
    """Ask for segments (and give some back) until ``memory`` refuses."""
    go.wait()
    try:
        while True:
            lent = memory.stage(1 << 12)
            if len(memory.pool) < 2:
                memory.unstage(lent)
    except DaemonUnavailable as exc:
        refused.append(exc)


def test_a_segment_asked_for_while_another_thread_closes_is_never_left_behind() -> None:
    before = ours()
    for _ in range(20):
        memory = SharedMemory()
        go = threading.Barrier(2)
        refused: list[Exception] = []
        worker = threading.Thread(target=stage_until_closed, args=(memory, go, refused))
        worker.start()
        go.wait()
        memory.close()
        worker.join(10)
        assert not worker.is_alive() and len(refused) == 1
        assert ours() == before
