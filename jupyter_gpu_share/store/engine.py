"""Engine creation with the settings each database needs.

SQLite (the pysqlite driver) gets WAL, ``synchronous=NORMAL``, foreign keys and a busy
timeout. Its writers begin ``BEGIN IMMEDIATE``: a deferred transaction that reads and then
writes fails at once with SQLITE_BUSY when another writer got in between, instead of
waiting. That is done by a dialect subclass rather than a ``begin`` event, because any
engine-level event slows down every statement the engine executes. Readers use a second
engine in the driver's default mode, where a lone SELECT needs no transaction, so reads
never queue behind the write lock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

DEFAULT_BUSY_TIMEOUT_MS = 30_000
WRITER_DRIVER = "gpushare_immediate"


class ImmediateSQLiteDialect(SQLiteDialect_pysqlite):
    """pysqlite, where SQLAlchemy begins every transaction with ``BEGIN IMMEDIATE``."""

    supports_statement_cache = True

    def on_connect(self) -> Any:
        """Take over BEGIN from the sqlite3 module, then run pysqlite's own set-up."""
        pysqlite_setup = super().on_connect()

        def setup(dbapi_connection: Any) -> None:
            dbapi_connection.isolation_level = None
            if pysqlite_setup is not None:
                pysqlite_setup(dbapi_connection)

        return setup

    def do_begin(self, dbapi_connection: Any) -> None:
        """Begin a transaction holding SQLite's write lock."""
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
        finally:
            cursor.close()


registry.register(f"sqlite.{WRITER_DRIVER}", __name__, "ImmediateSQLiteDialect")


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or "mode=memory" in str(url.query)


def _set_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            # NORMAL: a commit does not fsync; WAL data reaches the disk at checkpoints. That
            # is durable across application crashes (what we promise); a power loss can undo
            # the last commits. A Store checkpoints from a background thread (checkpoint.py);
            # this autocheckpoint is the backstop, seldom with much left to copy. Its size:
            # settlements rewrite the same balance pages, so a longer WAL folds many writes of
            # a page into one copy back.
            cursor.execute("PRAGMA wal_autocheckpoint = 20000")
        finally:
            cursor.close()


def _sqlite_engine(url: URL, *, writer: bool, echo: bool, busy_timeout_ms: int) -> Engine:
    options: dict[str, Any] = {"echo": echo}
    if _is_memory(url):
        # One shared connection, or every checkout would see a different empty database.
        options.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    driver = WRITER_DRIVER if writer else "pysqlite"
    engine = create_engine(url.set(drivername=f"sqlite+{driver}"), **options)
    _set_pragmas(engine, busy_timeout_ms)
    return engine


def _check_sqlite_driver(url: URL) -> None:
    if url.get_driver_name() not in ("pysqlite", WRITER_DRIVER):
        raise ValueError(f"only the standard sqlite3 driver is supported for SQLite: {url}")


def make_engines(
    url: str | URL, *, echo: bool = False, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
) -> tuple[Engine, Engine]:
    """Create ``(writer, reader)`` engines for ``url``; one engine twice unless file SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(parsed, echo=echo, pool_pre_ping=True)
        return engine, engine
    _check_sqlite_driver(parsed)
    writer = _sqlite_engine(parsed, writer=True, echo=echo, busy_timeout_ms=busy_timeout_ms)
    if _is_memory(parsed):
        return writer, writer
    reader = _sqlite_engine(parsed, writer=False, echo=echo, busy_timeout_ms=busy_timeout_ms)
    return writer, reader


def make_engine(
    url: str | URL, *, echo: bool = False, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
) -> Engine:
    """Create one engine for ``url`` whose transactions are fully transactional writers."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, echo=echo, pool_pre_ping=True)
    _check_sqlite_driver(parsed)
    return _sqlite_engine(parsed, writer=True, echo=echo, busy_timeout_ms=busy_timeout_ms)
