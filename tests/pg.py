"""PostgreSQL for tests and benchmarks: a database of one's own on a server, and, where
none is given, a throwaway server (the same as scripts/test.sh starts)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

POSTGRES_URL_VARIABLE = "GPU_SHARE_TEST_DB_URL"


def libpq_url(url: str, database: str) -> str:
    """Return a URL psycopg can connect to, naming ``database``."""
    parsed = make_url(url).set(drivername="postgresql", database=database)
    return parsed.render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """Create an empty database on the server of ``base_url``; drop it afterwards."""
    import psycopg

    admin_database = make_url(base_url).database or "postgres"
    database = f"gpu_share_test_{secrets.token_hex(6)}"
    with psycopg.connect(libpq_url(base_url, admin_database), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield make_url(base_url).set(database=database).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq_url(base_url, admin_database), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """The server of $GPU_SHARE_TEST_DB_URL, else a throwaway one on loopback (None of
    either: RuntimeError)."""
    given = os.environ.get(POSTGRES_URL_VARIABLE)
    if given:
        yield given
        return
    pg_bin = _bin()
    if pg_bin is None:
        raise RuntimeError("PostgreSQL is not installed (.ci/run installs it)")
    folder = Path(tempfile.mkdtemp(prefix="gpu-share-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def pg(tool: str, *args: str, check: bool = True) -> None:
        command = [*run_as, str(pg_bin / tool), "-D", str(folder), *args]
        subprocess.run(command, stdout=subprocess.DEVNULL, check=check)

    pg("initdb", "-U", "postgres", "-A", "trust")
    pg(
        "pg_ctl",
        "-o",
        f"-k {folder} -p {port} -h 127.0.0.1",
        "-l",
        str(folder / "log"),
        "-w",
        "start",
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-m", "immediate", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)
