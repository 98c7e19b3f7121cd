"""Fixtures of the churn tests: nothing of a chaos run may outlive it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_shared_memory() -> Iterator[None]:
    """Every trainer's Comm unlinks its shared-memory segments, killed daemon or not."""
    yield
    mine = sorted(p.name for p in Path("/dev/shm").glob(f"collnet-{os.getpid()}-*"))
    assert not mine, f"shared-memory segments left behind: {mine}"
