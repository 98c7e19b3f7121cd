"""Fixtures of the integration tests: log dumps on failure (leak checks: ../conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

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
