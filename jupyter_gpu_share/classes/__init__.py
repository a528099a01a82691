"""Classes: per-student quotas, class windows and the fair waiting line (pure rules, no I/O)."""

from .rules import (
    Quota,
    Used,
    WaitingLine,
    class_window_problem,
    parse_quota,
    quota_problem,
    quota_stop_us,
    remaining,
    week_start_us,
)

__all__ = [
    "Quota",
    "Used",
    "WaitingLine",
    "class_window_problem",
    "parse_quota",
    "quota_problem",
    "quota_stop_us",
    "remaining",
    "week_start_us",
]
