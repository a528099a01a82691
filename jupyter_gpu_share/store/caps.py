"""A renter's spending caps in the store, and what it spent since a day began."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from ..ledger import cost_at
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
        """The limits of several accounts, those that set any."""
        if not names:
            return {}
        c = accounts.c
        with self._reader.connect() as connection:
            rows = connection.execute(
                select(c.name, c.cap_session_micro, c.cap_day_micro, c.idle_limit_s)
                .where(c.name.in_(names))
                .where(
                    c.cap_session_micro.is_not(None)
                    | c.cap_day_micro.is_not(None)
                    | c.idle_limit_s.is_not(None)
                )
            ).all()
        return {
            row.name: Caps(row.cap_session_micro, row.cap_day_micro, row.idle_limit_s)
            for row in rows
        }

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

    def spent_since_many(self, payer_names: list[str], since_us: int) -> dict[str, int]:
        """What each payer's ended sessions cost from ``since_us`` on (a day's start): the
        whole bill of one that started since, the part after it of one that started
        before (billed per second from its start)."""
        if not payer_names:
            return {}
        s = sessions.c
        with self._reader.connect() as connection:
            rows = connection.execute(
                select(accounts.c.name, s.ready_us, s.ended_us, s.price_per_second_micro,
                       s.amount_micro)
                .select_from(sessions.join(accounts, accounts.c.id == s.payer_account_id))
                .where(
                    accounts.c.name.in_(payer_names),
                    s.state == "ended",
                    s.ended_us >= since_us,
                    s.amount_micro > 0,
                )
            ).all()  # fmt: skip
        spent = dict.fromkeys(payer_names, 0)
        for name, ready_us, ended_us, price, amount in rows:
            if ready_us is None or ready_us >= since_us:
                spent[name] += amount
            else:
                spent[name] += min(amount, cost_at(since_us, ended_us, price))
        return spent

    def spent_since(self, payer_name: str, since_us: int) -> int:
        """``spent_since_many`` of one payer."""
        return self.spent_since_many([payer_name], since_us)[payer_name]
