"""The security suite starts real brokers as the end-to-end tests do, and says its counts
at the end of the run (the CI log shows how many calls and cases it made)."""

from __future__ import annotations

import pytest

from ..e2e.conftest import make_cluster, pytest_runtest_makereport

__all__ = ["make_cluster", "pytest_runtest_makereport", "security_counts"]

COUNTS = pytest.StashKey[list[str]]()


@pytest.fixture
def security_counts(request: pytest.FixtureRequest) -> list[str]:
    """Lines for the end-of-run summary."""
    return request.config.stash.setdefault(COUNTS, [])


def pytest_terminal_summary(terminalreporter, config) -> None:  # type: ignore[no-untyped-def]
    lines = config.stash.get(COUNTS, [])
    if lines:
        terminalreporter.section("security suite")
        for line in lines:
            terminalreporter.write_line(line)
