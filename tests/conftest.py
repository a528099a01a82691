"""Test-wide setup."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from .pg import POSTGRES_URL_VARIABLE, fresh_database


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


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """Create an empty PostgreSQL database for one test and drop it afterwards."""
    base_url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not base_url:
        pytest.skip(f"set {POSTGRES_URL_VARIABLE} to a PostgreSQL URL to run this test")
    with fresh_database(base_url) as url:
        yield url
