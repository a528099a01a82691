"""Test-wide setup."""

from __future__ import annotations

import os
import pathlib
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL_VARIABLE = "GPU_SHARE_TEST_DB_URL"


def _pass_through(folder: pathlib.Path) -> None:
    info = folder.stat()
    if info.st_uid == 0 and not info.st_mode & 0o001:
        folder.chmod((info.st_mode & 0o7777) | 0o111)


@pytest.fixture(autouse=True)
def _kernel_uids_pass_through(request: pytest.FixtureRequest) -> None:
    """As root, the host agent runs each kernel as a uid of its own, which must pass through
    the folders above a scratch root (as it does through /tmp, the default's parent). pytest
    makes its temporary folders 0700: let other users pass through them (not list them)."""
    if os.geteuid() != 0 or "tmp_path" not in request.fixturenames:
        return
    tmp_path: pathlib.Path = request.getfixturevalue("tmp_path")
    for folder in (tmp_path.parent.parent, tmp_path.parent, tmp_path):
        _pass_through(folder)


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
