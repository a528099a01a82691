"""Fixtures that start real broker, host and server processes on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Cluster


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def make_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    """Start a broker (with BrokerApp traits as keyword arguments); stop everything after."""
    clusters: list[Cluster] = []

    def make(**traits: Any) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(clusters)}", **traits)
        clusters.append(cluster)
        return cluster

    (tmp_path / "cluster0").mkdir()
    for index in range(1, 3):
        (tmp_path / f"cluster{index}").mkdir()
    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster in clusters:
        if failed:
            print(cluster.logs())
        cluster.close()
