"""Renters' spending caps, enforced by the broker for every client (headless included).

The rules are ``ledger/caps.py``; this keeps what they need at hand for the budget loop
(four times a second): the caps of the payers with running sessions, read from the store
at most every two seconds (at once after a change through this broker), with the instant
this broker first saw each value; what their sessions cost since the day began, kept up
to date in memory as sessions settle; and which warnings were given.

Money rules a stranger's review set: a cap is never applied before this broker knew it
(lowering a cap must not cancel what already ran: a stop is billed at the later of the
cap's instant and the moment the cap was seen); the daily cap counts what each session
cost since midnight (UTC), however long before it started.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from ..ledger import cost_at, format_credits
from ..ledger.caps import cap_stop_us, day_start_us, warn_due
from ..store.caps import Caps

END_CAP_SESSION = "session cap reached"
END_CAP_DAY = "daily cap reached"
READ_EVERY_US = 2_000_000


def warning_text(kind: str, cost_micro: int, cap_micro: int) -> str:
    """The notice a notebook shows at 80 % of a cap."""
    what = "this session" if kind == "session" else "your sessions today"
    return (
        f"gpu-share: {what} cost {format_credits(cost_micro)} of your "
        f"{format_credits(cap_micro)}-credit {'session' if kind == 'session' else 'daily'} "
        "spending cap; the kernel stops at the cap (jupyter gpu-share caps to change it)"
    )


def since_day(billing: Iterable[tuple[int, int]], day_us: int) -> list[tuple[int, int]]:
    """Running sessions' ``(ready_us, price)`` as they bill from the day's start on."""
    return [(max(ready, day_us), price) for ready, price in billing]


class CapWatch:
    """The caps side of one broker's budget loop."""

    def __init__(self, store: Any, clock: Callable[[], int]) -> None:
        self.store = store
        self.clock = clock
        self._caps: dict[str, tuple[Caps, int]] = {}  # payer -> (caps, first seen here)
        self._spent: dict[str, int] = {}  # payer -> ended sessions' cost since the day began
        self._day = 0
        self._read_us = 0
        self._asked: set[str] = set()
        self._warned: set[tuple[str, str, int]] = set()  # (kind, session, cap)

    def changed(self) -> None:
        """Caps changed through this broker: read them again at the next check."""
        self._read_us = 0

    def settled(self, payer: str, ready_us: int | None, ended_us: int, price: int) -> None:
        """A session of the payer settled: what it cost today moves to the spent count."""
        if payer in self._spent and ready_us is not None and ended_us >= self._day:
            self._spent[payer] += cost_at(max(ready_us, self._day), ended_us, price)

    async def refresh(self, payers: set[str]) -> None:
        """Read the payers' caps and today's spending, when the last read is stale."""
        now = self.clock()
        day = day_start_us(now)
        fresh = now - self._read_us < READ_EVERY_US and day == self._day
        if fresh and payers <= self._asked:
            return
        self._read_us, self._day, self._asked = now, day, set(payers)
        read = await self.store.caps_of(sorted(payers)) if payers else {}
        previous = self._caps
        self._caps = {}
        for payer, caps in read.items():
            known = previous.get(payer)
            # A value is applied from when this broker first saw it, never before.
            self._caps[payer] = (caps, known[1] if known and known[0] == caps else now)
        daily = sorted(p for p, (caps, _) in self._caps.items() if caps.day_micro is not None)
        self._spent = await self.store.spent_since_many(daily, day) if daily else {}

    def limits(self, payer: str) -> Caps | None:
        """The payer's limits as last read."""
        known = self._caps.get(payer)
        return known[0] if known is not None else None

    def check(
        self,
        now: int,
        running: dict[str, list[Any]],
        elsewhere: dict[str, list[tuple[int, int]]],
    ) -> tuple[list[tuple[Any, str, int]], list[tuple[Any, str, tuple[str, str, int]]]]:
        """For each payer's own running sessions (live sessions with ``id``, ``ready_us``
        and ``price_per_second_micro``): the stops due ``(session, reason, bill_at_us)``
        and the warnings due ``(session, text, key)`` (``warned(key)`` once given)."""
        stops: list[tuple[Any, str, int]] = []
        warnings: list[tuple[Any, str, tuple[str, str, int]]] = []
        day = day_start_us(now)
        for payer, sessions in running.items():
            known = self._caps.get(payer)
            if known is None:
                continue
            caps, seen_us = known
            stopped: set[str] = set()
            billing = [(s.ready_us, s.price_per_second_micro) for s in sessions if s.ready_us]
            if caps.session_micro is not None:
                for live in sessions:
                    if not live.ready_us:
                        continue
                    at = cap_stop_us(
                        caps.session_micro, 0, [(live.ready_us, live.price_per_second_micro)]
                    )
                    cost = cost_at(live.ready_us, now, live.price_per_second_micro)
                    if at is not None and at <= now:
                        stops.append((live, END_CAP_SESSION, max(at, seen_us)))
                        stopped.add(live.id)
                    elif warn_due(cost, caps.session_micro):
                        key = ("session", live.id, caps.session_micro)
                        if key not in self._warned:
                            text = warning_text("session", cost, caps.session_micro)
                            warnings.append((live, text, key))
            if caps.day_micro is None:
                continue
            spent = self._spent.get(payer, 0)
            today = since_day(billing + elsewhere.get(payer, []), day)
            at = cap_stop_us(caps.day_micro, spent, today)
            if at is not None and at <= now:
                bill_at = max(at, seen_us, day)
                stops += [
                    (live, END_CAP_DAY, bill_at)
                    for live in sessions
                    if live.ready_us and live.id not in stopped
                ]
                continue
            total = spent + sum(cost_at(ready, now, price) for ready, price in today)
            if warn_due(total, caps.day_micro):
                for live in sessions:
                    key = ("day", live.id, caps.day_micro)
                    if live.ready_us and key not in self._warned:
                        warnings.append((live, warning_text("day", total, caps.day_micro), key))
        return stops, warnings

    def warned(self, key: tuple[str, str, int]) -> None:
        """A warning reached its notebook's relay."""
        self._warned.add(key)

    def forget(self, session_ids: Iterable[str]) -> None:
        """Sessions that ended: no more warnings to remember."""
        gone = set(session_ids)
        self._warned = {key for key in self._warned if key[1] not in gone}


def status_message(text: str, sync: bool = False) -> tuple[int, bytes]:
    """A relay text message (opcode 1) the user side shows as a notice in the cell
    (``sync``: and then brings back the kernel's files)."""
    record: dict[str, Any] = {"type": "status", "message": text}
    if sync:
        record["sync"] = True
    return (1, json.dumps(record).encode())
