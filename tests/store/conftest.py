"""Fixtures: a database URL for each store backend under test."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from jupyter_gpu_share.store import Store

POSTGRES_URL_VARIABLE = "GPU_SHARE_TEST_DB_URL"


def _libpq_url(url: str, database: str) -> str:
    """Return a URL psycopg can connect to, naming ``database``."""
    parsed = make_url(url).set(drivername="postgresql", database=database)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """Create an empty PostgreSQL database for one test and drop it afterwards."""
    base_url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not base_url:
        pytest.skip(f"set {POSTGRES_URL_VARIABLE} to a PostgreSQL URL to run this test")
    import psycopg

    admin_database = make_url(base_url).database or "postgres"
    database = f"gpu_share_test_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq_url(base_url, admin_database), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield make_url(base_url).set(database=database).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq_url(base_url, admin_database), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


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
