"""Hosts in the store: their connections (for reliability) and their earnings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, insert, select, update

from . import models

accounts = models.Account.__table__
sessions = models.Session.__table__
transactions = models.Transaction.__table__
entries = models.LedgerEntry.__table__
presence = models.HostPresence.__table__

_TOUCH_MANY = (
    update(presence)
    .where(
        presence.c.id.in_(bindparam("presence_ids", expanding=True)),
        presence.c.last_seen_us < bindparam("seen_us"),
    )
    .values(last_seen_us=bindparam("seen_us"))
)
_CHUNK = 5000


class HostStore:
    """The host part of ``Store`` (mixed in; uses its engines)."""

    # Store provides: _writer, _write(), _reader, _account_id().
    _writer: Any
    _write: Any
    _reader: Any
    _account_id: Any

    def open_presence(self, host: str, started_us: int, schedule: str | None = None) -> int:
        """Record that a host connected; return the id to checkpoint its heartbeats on."""
        with self._write() as connection:
            return connection.execute(
                insert(presence).values(
                    host_account_id=self._account_id(connection, host),
                    started_us=started_us,
                    last_seen_us=started_us,
                    schedule=(schedule or None) and schedule[:255],
                )
            ).inserted_primary_key[0]

    def touch_presence(self, presence_ids: list[int], seen_us: int) -> None:
        """Mark many connections as seen at ``seen_us`` (one statement per 5,000 hosts)."""
        if presence_ids:
            with self._write() as connection:
                for start in range(0, len(presence_ids), _CHUNK):
                    connection.execute(
                        _TOUCH_MANY,
                        {"presence_ids": presence_ids[start : start + _CHUNK], "seen_us": seen_us},
                    )

    def presence(self, host: str, since_us: int) -> list[tuple[int, int, str | None]]:
        """A host's connections (start, last seen, schedule) that reach past ``since_us``."""
        query = (
            select(presence.c.started_us, presence.c.last_seen_us, presence.c.schedule)
            .join(accounts, accounts.c.id == presence.c.host_account_id)
            .where(accounts.c.name == host, presence.c.last_seen_us >= since_us)
            .order_by(presence.c.started_us)
        )
        with self._reader.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]

    def first_seen(self, host: str) -> int | None:
        """When a host first connected, or None."""
        query = (
            select(func.min(presence.c.started_us))
            .join(accounts, accounts.c.id == presence.c.host_account_id)
            .where(accounts.c.name == host)
        )
        with self._reader.connect() as connection:
            return connection.execute(query).scalar()

    def host_session_outcomes(self, host: str, since_us: int) -> tuple[int, int]:
        """(sessions that ran, sessions ended by host loss) on a host since ``since_us``."""
        host_account = accounts.alias("host")
        query = (
            select(
                func.count(sessions.c.id),
                func.coalesce(
                    func.sum((sessions.c.end_reason == "host lost").cast(models.Integer)), 0
                ),
            )
            .join(host_account, host_account.c.id == sessions.c.host_account_id)
            .where(
                host_account.c.name == host,
                sessions.c.state == "ended",
                sessions.c.ready_us.is_not(None),
                sessions.c.ended_us >= since_us,
            )
        )
        with self._reader.connect() as connection:
            total, lost = connection.execute(query).one()
        return int(total), int(lost)

    def earnings(self, host: str) -> list[dict[str, Any]]:
        """Each settled session of a host: when, seconds, the renter's price, the host's share."""
        query = (
            select(
                sessions.c.id,
                sessions.c.ready_us,
                sessions.c.ended_us,
                sessions.c.billed_seconds,
                sessions.c.amount_micro,
                entries.c.amount_micro.label("host_micro"),
            )
            .join(transactions, transactions.c.session_id == sessions.c.id)
            .join(entries, entries.c.transaction_id == transactions.c.id)
            .join(accounts, accounts.c.id == entries.c.account_id)
            .where(accounts.c.name == host, transactions.c.kind == "settlement")
            .order_by(sessions.c.ended_us.desc())
        )
        with self._reader.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]
