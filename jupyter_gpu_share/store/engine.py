"""Engine creation with the settings each database needs.

SQLite (the pysqlite driver) gets WAL, ``synchronous=NORMAL``, foreign keys and a busy
timeout. Its writers begin ``BEGIN IMMEDIATE``: a deferred transaction that reads and then
writes fails at once with SQLITE_BUSY when another writer got in between, instead of
waiting. As in SQLAlchemy's documented recipe for pysqlite ("Serializable isolation /
Savepoints / Transactional DDL"), the driver's own BEGIN is switched off at connect; the
store emits ``BEGIN IMMEDIATE`` as each write transaction's first statement
(``Store._write``), which costs less than the recipe's ``begin`` event (an engine event
slows down every statement the engine runs). Readers use a second engine in the driver's
default mode, where a lone SELECT needs no transaction, so reads never queue behind the
write lock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

DEFAULT_BUSY_TIMEOUT_MS = 30_000


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
    engine = create_engine(url.set(drivername="sqlite+pysqlite"), **options)
    _set_pragmas(engine, busy_timeout_ms)
    if writer:
        _begin_immediate(engine)
    return engine


def _begin_immediate(engine: Engine) -> None:
    """The driver of ``engine`` begins no transaction itself: the store begins its writes
    with ``BEGIN IMMEDIATE`` (``Store._write``)."""

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own


def _check_sqlite_driver(url: URL) -> None:
    if url.get_driver_name() != "pysqlite":
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
    engine = _sqlite_engine(parsed, writer=True, echo=echo, busy_timeout_ms=busy_timeout_ms)

    # Outside the Store (migrations, tools) nothing else emits BEGIN: SQLAlchemy's recipe.
    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
