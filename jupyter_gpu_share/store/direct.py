"""Core statements compiled once and run straight on a SQLite connection's DBAPI cursor.

``Connection.execute`` spends some 50-80 us of Python on every statement (cache key,
execution context, parameter processing, result set-up) where SQLite needs 10-20 us for
the small keyed statements of a settlement: of the ~0.5 ms one settlement took, SQLite's
own work, commit included, was less than a third. A ``Prepared`` statement is a Core
statement compiled once for a dialect; ``DirectCursor`` runs it on the cursor of a
connection that SQLAlchemy has begun, so BEGIN IMMEDIATE, COMMIT, ROLLBACK and pooling
stay SQLAlchemy's.

Only for drivers with positional parameters (pysqlite's ``?``) and for statements whose
column types need no bind or result processing on the dialect: ``Prepared`` checks both.
Driver errors are raised as SQLAlchemy's (``IntegrityError``, ``OperationalError``...),
as ``Connection.execute`` raises them. ``create_engine(echo=True)`` does not log these
statements.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter
from typing import Any, NoReturn

from sqlalchemy import Connection, Select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.base import Executable


class Prepared:
    """A Core statement compiled for one dialect with positional parameters.

    Parameters are passed by bind name as with ``Connection.execute``; values fixed in the
    statement itself (``.values(state="ended")``) are always those, except a fixed None,
    which the caller must give.
    """

    __slots__ = ("_fixed", "_get", "row", "sql")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        """Compile ``statement`` and check that its types need no processing."""
        if not dialect.positional:
            raise ValueError(f"{dialect.name} driver does not take positional parameters")
        compiled = statement.compile(dialect=dialect)
        for bind in compiled.binds.values():
            if bind.type.dialect_impl(dialect).bind_processor(dialect) is not None:
                raise ValueError(f"parameter {bind.key!r} needs conversion: {compiled.string}")
        self.sql: str = compiled.string
        names = tuple(compiled.positiontup or ())
        # Values given in the statement itself; every other parameter is the caller's.
        self._fixed = {name: value for name, value in compiled.params.items() if value is not None}
        self._get: Callable[[Mapping[str, Any]], tuple[Any, ...]]
        if len(names) > 1:
            self._get = itemgetter(*names)
        else:  # itemgetter of one name returns the value itself, not a tuple
            self._get = lambda params: tuple(params[name] for name in names)
        self.row: type | None = None
        if isinstance(statement, Select):
            columns = statement.selected_columns
            for column in columns:
                if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
                    raise ValueError(f"column {column.key!r} needs conversion: {compiled.string}")
            self.row = namedtuple("Row", columns.keys())  # type: ignore[misc]

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """Return the positional parameters for named ``params``."""
        if self._fixed:
            params = {**params, **self._fixed}
        return self._get(params)


class DirectCursor:
    """A DBAPI cursor on a SQLAlchemy connection, for ``Prepared`` statements."""

    def __init__(self, connection: Connection) -> None:
        """Open a cursor on the connection's DBAPI connection, in its current transaction."""
        self._dialect = connection.dialect
        self._error = self._dialect.loaded_dbapi.Error
        self._cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]

    def __enter__(self) -> DirectCursor:
        """Return the cursor itself."""
        return self

    def __exit__(self, *_exc_info: object) -> None:
        """Close the cursor."""
        self._cursor.close()

    def execute(self, prepared: Prepared, params: Mapping[str, Any]) -> int:
        """Run a statement once and return the cursor's ``lastrowid``."""
        args = prepared.args(params)
        try:
            self._cursor.execute(prepared.sql, args)
        except self._error as error:
            self._raise(error, prepared, args)
        return self._cursor.lastrowid

    def executemany(self, prepared: Prepared, many: Iterable[Mapping[str, Any]]) -> None:
        """Run a statement once for each set of parameters."""
        args = [prepared.args(params) for params in many]
        try:
            self._cursor.executemany(prepared.sql, args)
        except self._error as error:
            self._raise(error, prepared, args)

    def rows(self, prepared: Prepared, params: Mapping[str, Any]) -> list[Any]:
        """Run a SELECT and return its rows as named tuples."""
        assert prepared.row is not None, "not a SELECT"
        args = prepared.args(params)
        try:
            fetched = self._cursor.execute(prepared.sql, args).fetchall()
        except self._error as error:
            self._raise(error, prepared, args)
        make = prepared.row._make  # type: ignore[attr-defined]
        return [make(row) for row in fetched]

    def _raise(self, error: Exception, prepared: Prepared, args: Any) -> NoReturn:
        raise DBAPIError.instance(
            prepared.sql,
            args,
            error,
            self._error,
            dialect=self._dialect,
            ismulti=isinstance(args, list),
        ) from error
