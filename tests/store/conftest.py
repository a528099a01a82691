"""Fixtures: a database URL for each store backend under test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_gpu_share.store import Store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return the URL of an empty database: a SQLite file, or PostgreSQL when configured."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'store.sqlite'}"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """Open a migrated store with a user, a host and some credit."""
    with Store(store_url, upgrade=True) as opened:
        opened.ensure_account("alice", "user")
        opened.ensure_account("bob", "host")
        opened.credit("alice", 1_000_000_000, memo="starter credit")
        yield opened
