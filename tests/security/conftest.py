"""The security suite starts real brokers as the end-to-end tests do."""

from __future__ import annotations

from ..e2e.conftest import make_cluster, pytest_runtest_makereport

__all__ = ["make_cluster", "pytest_runtest_makereport"]
