"""SQLite is for one broker: a second broker on the same database file refuses to start.

Two brokers on one SQLite file would each meter and settle every session in memory (they
share no leases: SQLite has no connection that outlives a transaction to hold them by), so
the first broker holds an exclusive ``flock`` on a file beside the database for as long as
it runs; the kernel drops it when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from sqlalchemy.engine import make_url

from .records import StoreError


class AnotherBroker(StoreError):
    """Another broker already serves this SQLite database."""


def lock_path(url: str) -> Path | None:
    """The lock file of a SQLite file database (None: not one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database + ".broker-lock")


def hold_single_broker_lock(url: str) -> IO[str] | None:
    """Take the database's one-broker lock for this process's lifetime and return its file
    (keep it open); None for a database that is not a SQLite file."""
    path = lock_path(url)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the broker
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(32).strip() or "unknown"
        handle.close()
        raise AnotherBroker(
            f"another broker (pid {holder}) already serves {url}; SQLite is for one broker: "
            "run several on PostgreSQL (--db=postgresql+psycopg://...)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
