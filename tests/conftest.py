"""Fixtures of every test: no shared-memory segment of this process outlives the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Segment name -> the test during which it appeared: a leak found at the end of
# the session names where it came from, not only the last test that ran.
_APPEARED_IN: dict[str, str] = {}


def _ours() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"collnet-{os.getpid()}-*")}


@pytest.fixture(autouse=True)
def _note_new_shared_memory(request: pytest.FixtureRequest) -> Iterator[None]:
    before = _ours()
    yield
    for name in _ours() - before:
        _APPEARED_IN.setdefault(name, request.node.nodeid)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_shared_memory() -> Iterator[None]:
    """Every Comm this process opened unlinks its shared-memory segments on close,
    killed daemon or not."""
    yield
    left = sorted(_ours())
    where = [f"{name} (appeared during {_APPEARED_IN.get(name, 'no test')})" for name in left]
    assert not left, f"shared-memory segments left behind: {where}"
