"""A renter's spending caps in the store, and what it spent since a day began."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update

from . import models
from .records import NotFound

accounts = models.Account.__table__
sessions = models.Session.__table__


@dataclass(frozen=True)
class Caps:
    """A renter's limits: spending caps in micro-credits (None: no cap), and seconds a
    kernel may be idle (None: the broker's default; 0: never stopped for it)."""

    session_micro: int | None = None
    day_micro: int | None = None
    idle_limit_s: int | None = None

    @property
    def any(self) -> bool:
        return self.session_micro is not None or self.day_micro is not None


class CapStore:
    """The caps part of ``Store`` (mixed in; uses its engines)."""

    _write: Any
    _reader: Any

    def get_caps(self, account_name: str) -> Caps:
        """An account's caps."""
        with self._reader.connect() as connection:
            row = connection.execute(
                select(
                    accounts.c.cap_session_micro, accounts.c.cap_day_micro, accounts.c.idle_limit_s
                ).where(accounts.c.name == account_name)
            ).first()
        if row is None:
            raise NotFound(f"no account named {account_name!r}")
        return Caps(row.cap_session_micro, row.cap_day_micro, row.idle_limit_s)

    def caps_of(self, names: list[str]) -> dict[str, Caps]:
        """The caps of several accounts, those that have any."""
        if not names:
            return {}
        with self._reader.connect() as connection:
            rows = connection.execute(
                select(accounts.c.name, accounts.c.cap_session_micro, accounts.c.cap_day_micro)
                .where(accounts.c.name.in_(names))
                .where(
                    (accounts.c.cap_session_micro.is_not(None))
                    | (accounts.c.cap_day_micro.is_not(None))
                )
            ).all()
        return {row.name: Caps(row.cap_session_micro, row.cap_day_micro) for row in rows}

    def set_caps(self, account_name: str, caps: Caps) -> Caps:
        """Set an account's caps; return them."""
        with self._write() as connection:
            done = connection.execute(
                update(accounts)
                .where(accounts.c.name == account_name)
                .values(
                    cap_session_micro=caps.session_micro,
                    cap_day_micro=caps.day_micro,
                    idle_limit_s=caps.idle_limit_s,
                )
            )
        if done.rowcount == 0:
            raise NotFound(f"no account named {account_name!r}")
        return caps

    def spent_since(self, payer_name: str, since_us: int) -> int:
        """What the payer's ended sessions that started at or after ``since_us`` cost."""
        with self._reader.connect() as connection:
            payer = select(accounts.c.id).where(accounts.c.name == payer_name).scalar_subquery()
            total = connection.execute(
                select(func.coalesce(func.sum(sessions.c.amount_micro), 0)).where(
                    sessions.c.payer_account_id == payer,
                    sessions.c.state == "ended",
                    sessions.c.created_us >= since_us,
                )
            ).scalar()
        return int(total or 0)
