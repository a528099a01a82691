"""A host's reliability score: pure arithmetic over its connections and its sessions.

uptime = time connected inside the host's declared availability windows / declared time,
over the last 30 days (from the host's first connection); completion = share of sessions
not ended by host loss; score = uptime x completion.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..host.schedule import Schedule, parse_schedule

DAY_S = 86_400
WEEK_S = 7 * DAY_S
# 1970-01-01 was a Thursday: the Monday before it is 3 days earlier.
_MONDAY_SHIFT_S = 3 * DAY_S
WINDOW_DAYS = 30
MIN_OBSERVED_S = 3600
NEW_HOST_PRIOR = 0.9
ALWAYS = ((0, WEEK_S),)


@dataclass(frozen=True)
class Reliability:
    """A host's score and what it is made of."""

    score: float | None
    uptime: float | None
    sessions: int
    lost_sessions: int


def _weekly_windows(schedule: Schedule | None) -> tuple[tuple[int, int], ...]:
    if schedule is None:
        return ALWAYS
    clipped = []
    for start, end in schedule.windows:
        start, end = max(start, 0), min(end, WEEK_S)
        if start < end:
            clipped.append((start, end))
    return tuple(clipped)


def open_seconds(windows: Iterable[tuple[int, int]], start_s: float, end_s: float) -> float:
    """Seconds of [start_s, end_s) (host wall-clock seconds) inside weekly windows."""
    windows = tuple(windows)
    if end_s <= start_s:
        return 0.0
    total = 0.0
    first_week = int((start_s + _MONDAY_SHIFT_S) // WEEK_S)
    last_week = int((end_s + _MONDAY_SHIFT_S) // WEEK_S)
    for week in range(first_week, last_week + 1):
        base = week * WEEK_S - _MONDAY_SHIFT_S
        for window_start, window_end in windows:
            lo, hi = max(start_s, base + window_start), min(end_s, base + window_end)
            if hi > lo:
                total += hi - lo
    return total


def uptime_fraction(
    connections: Iterable[tuple[int, int, str | None]],
    schedule_spec: str | None,
    utc_offset_s: int,
    since_us: int,
    now_us: int,
) -> float | None:
    """Connected share of the declared window time between ``since_us`` and ``now_us``."""
    try:
        windows = _weekly_windows(parse_schedule(schedule_spec or ""))
    except ValueError:
        windows = ALWAYS
    to_local = lambda us: us / 1e6 + utc_offset_s  # noqa: E731
    declared = open_seconds(windows, to_local(since_us), to_local(now_us))
    if declared <= 0:
        return None
    connected = 0.0
    for started, last_seen, _ in connections:
        lo, hi = max(started, since_us), min(last_seen, now_us)
        connected += open_seconds(windows, to_local(lo), to_local(hi))
    return min(1.0, connected / declared)


def reliability(uptime: float | None, sessions: int, lost_sessions: int) -> Reliability:
    """Combine uptime and session completion into one score (None: nothing known yet)."""
    completion = None if sessions == 0 else 1 - lost_sessions / sessions
    parts = [part for part in (uptime, completion) if part is not None]
    score = None
    if parts:
        score = 1.0
        for part in parts:
            score *= part
    return Reliability(score=score, uptime=uptime, sessions=sessions, lost_sessions=lost_sessions)


def ranking_reliability(score: float | None) -> float:
    """The reliability matching divides the price by (new hosts get a fair prior)."""
    return NEW_HOST_PRIOR if score is None else max(score, 0.05)
