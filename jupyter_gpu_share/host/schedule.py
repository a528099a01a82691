"""When a host lends its GPUs: weekly availability windows in the host's time zone.

A spec is a ``;``-separated list of entries. Each entry is days, a time range, or both:

- ``mon-fri 18:00-08:00``: Monday to Friday from 18:00 until 08:00 the next morning (a
  window that crosses midnight belongs to the day it starts on);
- ``sat,sun``: whole days; ``daily`` (or ``*``) means every day;
- ``09:00-17:00``: every day; ``24:00`` may end a range.

Day names are the first three letters (``mon`` .. ``sun``, any case); ranges may wrap
(``fri-mon``). Everything here is a pure function of the ``now`` passed in (an aware or a
naive local ``datetime``), so tests inject their clock. Wall-clock arithmetic is used: a
window is the same local hours every week.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_S = 24 * 3600
WEEK_S = 7 * DAY_S
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


def _parse_time(text: str, entry: str, allow_24: bool) -> int:
    match = _TIME.match(text)
    if not match:
        raise ValueError(f"bad time {text!r} in {entry!r}: use HH:MM, e.g. 18:00")
    hours, minutes = int(match.group(1)), int(match.group(2))
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not allow_24)):
        raise ValueError(f"bad time {text!r} in {entry!r}: hours 00-23, minutes 00-59")
    return hours * 3600 + minutes * 60


_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_NAMES = {**{d: i for i, d in enumerate(DAYS)}, **{d: i for i, d in enumerate(_FULL)}}


def _parse_day(text: str, entry: str) -> int:
    name = text.strip().lower()
    if name not in _DAY_NAMES:
        raise ValueError(
            f"bad day {text.strip()!r} in {entry!r}: use mon, tue, wed, thu, fri, sat or sun"
        )
    return _DAY_NAMES[name]


def _parse_days(text: str, entry: str) -> list[int]:
    if text.strip().lower() in ("daily", "*", "every day", "all"):
        return list(range(7))
    days: list[int] = []
    for part in text.split(","):
        if not part.strip():
            raise ValueError(f"empty day in {entry!r}")
        if "-" in part:
            first_text, _, last_text = part.partition("-")
            first, last = _parse_day(first_text, entry), _parse_day(last_text, entry)
            day = first
            while True:
                days.append(day)
                if day == last:
                    break
                day = (day + 1) % 7
        else:
            days.append(_parse_day(part, entry))
    return sorted(set(days))


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class Schedule:
    """Weekly windows as ``[start, end)`` seconds since Monday 00:00, merged and sorted.

    The windows are repeated one week before and after, so a window that wraps from Sunday
    into Monday is found from either side.
    """

    spec: str
    windows: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """Parse a spec; raise ValueError with a message that names the bad part."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("empty schedule: give windows like 'mon-fri 18:00-08:00; sat,sun'")
        base: list[tuple[int, int]] = []
        for raw in spec.split(";"):
            entry = raw.strip()
            if not entry:
                continue
            words = entry.split()
            if len(words) > 2:
                # "mon - fri 18:00-08:00" or "mon, sun": join the day words back up
                words = ["".join(words[:-1]), words[-1]] if ":" in words[-1] else ["".join(words)]
            if len(words) == 2:
                days_text, range_text = words
            elif ":" in words[0]:
                days_text, range_text = "daily", words[0]
            else:
                days_text, range_text = words[0], ""
            days = _parse_days(days_text, entry)
            if range_text:
                start_text, dash, end_text = range_text.partition("-")
                if not dash:
                    raise ValueError(f"bad time range {range_text!r} in {entry!r}: use HH:MM-HH:MM")
                start = _parse_time(start_text, entry, allow_24=False)
                end = _parse_time(end_text, entry, allow_24=True)
                if start == end:
                    raise ValueError(f"empty window {range_text!r} in {entry!r}")
                length = end - start if end > start else end + DAY_S - start
            else:
                start, length = 0, DAY_S
            base += [(day * DAY_S + start, day * DAY_S + start + length) for day in days]
        if not base:
            raise ValueError("empty schedule: give windows like 'mon-fri 18:00-08:00; sat,sun'")
        spread = [(s + shift, e + shift) for s, e in base for shift in (-WEEK_S, 0, WEEK_S)]
        return cls(spec=spec.strip(), windows=tuple(_merge(spread)))

    @property
    def always_open(self) -> bool:
        """Tell whether the windows cover the whole week."""
        return any(s <= 0 and e >= WEEK_S for s, e in self.windows)

    @staticmethod
    def _offset(now: datetime) -> float:
        """Seconds since the Monday 00:00 (local wall clock) of ``now``'s week."""
        wall = now.replace(tzinfo=None)
        midnight = wall.replace(hour=0, minute=0, second=0, microsecond=0)
        return now.weekday() * DAY_S + (wall - midnight).total_seconds()

    def _window_at(self, offset: float) -> tuple[int, int] | None:
        for start, end in self.windows:
            if start <= offset < end:
                return start, end
        return None

    def is_open(self, now: datetime) -> bool:
        """Tell whether ``now`` falls inside a window."""
        return self._window_at(self._offset(now)) is not None

    @staticmethod
    def _week_start(now: datetime) -> datetime:
        """Monday 00:00 of ``now``'s week, in ``now``'s time zone."""
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - timedelta(days=now.weekday())

    def closes_at(self, now: datetime) -> datetime | None:
        """Return when the window open at ``now`` closes; None when closed or always open."""
        if self.always_open:
            return None
        window = self._window_at(self._offset(now))
        if window is None:
            return None
        return self._week_start(now) + timedelta(seconds=window[1])

    def next_open(self, now: datetime) -> datetime | None:
        """Return ``now`` when open, else when the next window opens."""
        offset = self._offset(now)
        if self._window_at(offset) is not None:
            return now
        starts = [s for s, _ in self.windows if s > offset]
        return self._week_start(now) + timedelta(seconds=min(starts)) if starts else None

    def seconds_left(self, now: datetime) -> float | None:
        """Seconds until the current window closes (None: closed or always open)."""
        closes = self.closes_at(now)
        return None if closes is None else (closes - now).total_seconds()


def parse_schedule(spec: str) -> Schedule | None:
    """Parse a spec; an empty spec means no schedule (always open) and returns None."""
    if not spec or not spec.strip():
        return None
    return Schedule.parse(spec)
