"""Spending caps as rules: when a cap stops a renter's sessions, and when to warn.

A session cap bounds what one session costs; a day cap what the renter's own sessions
that started on one day (UTC) cost in all, the running ones included. Class sessions are
the class's money, under the class's budget and quotas, and count against neither.
"""

from __future__ import annotations

from collections.abc import Iterable

from .rules import credit_runs_out_us

DAY_US = 86_400 * 1_000_000
WARN_PERCENT = 80


def day_start_us(now_us: int) -> int:
    """The start (UTC midnight) of the day of ``now_us``."""
    return now_us - now_us % DAY_US


def cap_stop_us(
    cap_micro: int | None, spent_micro: int, running: Iterable[tuple[int, int]]
) -> int | None:
    """When the running sessions, as ``(ready_us, price_per_second_micro)``, together with
    ``spent_micro`` already spent, reach ``cap_micro`` (None: no cap, or nothing bills).
    The same instant the credit rule uses: at or before the cap is crossed, never after."""
    if cap_micro is None:
        return None
    return credit_runs_out_us(cap_micro - spent_micro, running)


def warn_due(cost_micro: int, cap_micro: int | None, percent: int = WARN_PERCENT) -> bool:
    """Whether spending has reached the warning share of a cap (and not the cap itself)."""
    if cap_micro is None or cap_micro <= 0:
        return False
    return cost_micro * 100 >= cap_micro * percent and cost_micro < cap_micro
