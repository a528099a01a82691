"""Wall-clock time as integer microseconds since the epoch."""

from __future__ import annotations

import time


def now_us() -> int:
    """Return the current time in integer microseconds since the epoch."""
    return time.time_ns() // 1000
