"""Quota arithmetic, class windows and the waiting line at the start of class."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..ledger import parse_positive_credits

US = 1_000_000
WEEK_US = 7 * 24 * 3600 * US


@dataclass(frozen=True)
class Quota:
    """A student's allowance in a class; None means no limit of that kind."""

    seconds: int | None = None
    micro: int | None = None
    weekly_seconds: int | None = None


@dataclass(frozen=True)
class Used:
    """What a student has used in a class (ended sessions, plus running ones where relevant)."""

    seconds: int = 0
    micro: int = 0
    week_seconds: int = 0


def parse_quota(text: str) -> tuple[int | None, int | None]:
    """Parse '2h', '90m', '3600s' as seconds, or a decimal such as '5' or '2.5' as credits.

    Returns (seconds, micro-credits), one of them None.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([hms])\s*", text)
    if match:
        value, unit = float(match.group(1)), match.group(2)
        seconds = round(value * {"h": 3600, "m": 60, "s": 1}[unit])
        if seconds <= 0:
            raise ValueError(f"quota must be more than zero: {text!r}")
        return seconds, None
    try:
        return None, parse_positive_credits(text.strip())
    except ValueError as error:
        raise ValueError(
            f"quota {text!r} is neither a duration (2h, 90m, 3600s) nor credits (5, 2.5): {error}"
        ) from None


def remaining(quota: Quota, used: Used) -> tuple[int | None, int | None]:
    """Seconds and micro-credits left (None where unlimited); the weekly limit counts too."""
    seconds_left = None
    if quota.seconds is not None:
        seconds_left = quota.seconds - used.seconds
    if quota.weekly_seconds is not None:
        week_left = quota.weekly_seconds - used.week_seconds
        seconds_left = week_left if seconds_left is None else min(seconds_left, week_left)
    micro_left = None if quota.micro is None else quota.micro - used.micro
    return seconds_left, micro_left


def quota_problem(quota: Quota, used: Used) -> str | None:
    """Why a student may not start now, or None."""
    seconds_left, micro_left = remaining(quota, used)
    if seconds_left is not None and seconds_left <= 0:
        return "your GPU time quota for this class is used up"
    if micro_left is not None and micro_left <= 0:
        return "your credit quota for this class is used up"
    return None


def quota_stop_us(
    quota: Quota, used: Used, ready_us: int, price_per_second_micro: int
) -> int | None:
    """The instant a session started at ``ready_us`` reaches the student's quota (None: never)."""
    seconds_left, micro_left = remaining(quota, used)
    candidates = []
    if seconds_left is not None:
        candidates.append(ready_us + max(0, seconds_left) * US)
    if micro_left is not None and price_per_second_micro > 0:
        candidates.append(ready_us + max(0, micro_left) * US // price_per_second_micro)
    return min(candidates) if candidates else None


def week_start_us(now_us: int) -> int:
    """Monday 00:00 UTC of the week holding ``now_us``."""
    now = datetime.fromtimestamp(now_us / US, tz=timezone.utc)
    monday = (now - timedelta(days=now.weekday())).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return int(monday.timestamp()) * US


def class_window_problem(starts_us: int | None, ends_us: int | None, now_us: int) -> str | None:
    """Why a class does not run now, or None."""
    if starts_us is not None and now_us < starts_us:
        when = datetime.fromtimestamp(starts_us / US, tz=timezone.utc).isoformat()
        return f"the class starts on {when}"
    if ends_us is not None and now_us >= ends_us:
        return "the class has ended"
    return None


class WaitingLine:
    """First come, first served places for students who found the class pool full.

    A student keeps their place by asking again within ``patience_us``; who stops asking
    leaves the line.
    """

    def __init__(self, patience_us: int = 30 * US):
        self.patience_us = patience_us
        self._last_asked: OrderedDict[str, int] = OrderedDict()

    def _drop_stale(self, now_us: int) -> None:
        for student, asked in list(self._last_asked.items()):
            if now_us - asked > self.patience_us:
                del self._last_asked[student]

    def place(self, student: str, now_us: int) -> int:
        """Join the line (or refresh one's place); return the 1-based place."""
        self._drop_stale(now_us)
        self._last_asked[student] = now_us
        return list(self._last_asked).index(student) + 1

    def peek(self, student: str, now_us: int) -> int | None:
        """The student's place without joining, or None."""
        self._drop_stale(now_us)
        if student not in self._last_asked:
            return None
        return list(self._last_asked).index(student) + 1

    def __len__(self) -> int:
        return len(self._last_asked)

    def leave(self, student: str) -> None:
        """Leave the line (served, or gave up)."""
        self._last_asked.pop(student, None)
