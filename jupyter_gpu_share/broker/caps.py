"""Renters' spending caps, enforced by the broker for every client (headless included).

The rules are ``ledger/caps.py``; this keeps what they need at hand for the budget loop
(four times a second): the caps of the payers with running sessions and what their
sessions that started today cost, read from the store at most every two seconds (and at
once after a change of caps through this broker); and which sessions were warned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from ..ledger import format_credits
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


class CapWatch:
    """The caps side of one broker's budget loop."""

    def __init__(self, store: Any, clock: Callable[[], int]) -> None:
        self.store = store
        self.clock = clock
        self._caps: dict[str, Caps] = {}
        self._spent: dict[str, int] = {}
        self._day = 0
        self._read_us = 0
        self._asked: set[str] = set()
        self._warned: set[tuple[str, str]] = set()

    def changed(self) -> None:
        """Caps changed through this broker: read them again at the next check."""
        self._read_us = 0

    def settled(self) -> None:
        """A session settled: what was spent today is read again at the next check."""
        self._read_us = 0

    async def refresh(self, payers: set[str]) -> None:
        """Read the payers' caps and today's spending, when the last read is stale."""
        now = self.clock()
        day = day_start_us(now)
        fresh = now - self._read_us < READ_EVERY_US and day == self._day
        if fresh and payers <= self._asked:
            return
        self._read_us, self._day, self._asked = now, day, set(payers)
        self._caps = await self.store.caps_of(sorted(payers)) if payers else {}
        self._spent = {
            payer: await self.store.spent_since(payer, day)
            for payer, caps in self._caps.items()
            if caps.day_micro is not None
        }

    def check(
        self,
        now: int,
        running: dict[str, list[Any]],
        elsewhere: dict[str, list[tuple[int, int]]],
        cost: Callable[[Any, int], int],
    ) -> tuple[list[tuple[Any, str, int]], list[tuple[Any, str]]]:
        """For each payer's own running sessions (``running``: live sessions with
        ``ready_us``, ``price_per_second_micro``, ``created_us``, ``id``): the stops due
        ``(session, reason, at_us)`` and the warnings due ``(session, text)``."""
        stops: list[tuple[Any, str, int]] = []
        warnings: list[tuple[Any, str]] = []
        for payer, sessions in running.items():
            caps = self._caps.get(payer)
            if caps is None or not caps.any:
                continue
            stopped: set[str] = set()
            for live in sessions:
                at = cap_stop_us(caps.session_micro, 0, _billing([live]))
                if at is not None and at <= now:
                    stops.append((live, END_CAP_SESSION, at))
                    stopped.add(live.id)
                elif self._first("session", live.id) and warn_due(
                    cost(live, now), caps.session_micro
                ):
                    assert caps.session_micro is not None
                    text = warning_text("session", cost(live, now), caps.session_micro)
                    warnings.append((live, text))
                    self._warned.add(("session", live.id))
            if caps.day_micro is None:
                continue
            day = day_start_us(now)
            today = [live for live in sessions if live.created_us >= day]
            spent = self._spent.get(payer, 0)
            billing = _billing(today) + elsewhere.get(payer, [])
            at = cap_stop_us(caps.day_micro, spent, billing)
            if at is not None and at <= now:
                stops += [(live, END_CAP_DAY, at) for live in today if live.id not in stopped]
                continue
            total = spent + sum(cost(live, now) for live in today)
            for live in today:
                if self._first("day", live.id) and warn_due(total, caps.day_micro):
                    warnings.append((live, warning_text("day", total, caps.day_micro)))
                    self._warned.add(("day", live.id))
        return stops, warnings

    def _first(self, kind: str, session_id: str) -> bool:
        return (kind, session_id) not in self._warned

    def forget(self, session_ids: Iterable[str]) -> None:
        """Sessions that ended: no more warnings to remember."""
        gone = set(session_ids)
        self._warned = {(kind, sid) for kind, sid in self._warned if sid not in gone}


def _billing(sessions: list[Any]) -> list[tuple[int, int]]:
    return [(s.ready_us, s.price_per_second_micro) for s in sessions if s.ready_us is not None]


def status_message(text: str, sync: bool = False) -> tuple[int, bytes]:
    """A relay text message (opcode 1) the user side shows as a notice in the cell
    (``sync``: and then brings back the kernel's files)."""
    record: dict[str, Any] = {"type": "status", "message": text}
    if sync:
        record["sync"] = True
    return (1, json.dumps(record).encode())
