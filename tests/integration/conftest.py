"""Fixtures shared by the integration tests: log dumps on failure, leak checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import LIVE_CLUSTERS


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _cluster_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, print the tail of every running cluster's logs."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for cluster in LIVE_CLUSTERS:
            print(f"=== cluster in {cluster.workdir}\n{cluster.logs()}")


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_shared_memory() -> Iterator[None]:
    """Every Comm this process opened unlinks its shared-memory segments on close."""
    yield
    mine = sorted(p.name for p in Path("/dev/shm").glob(f"collnet-{os.getpid()}-*"))
    assert not mine, f"shared-memory segments left behind: {mine}"
