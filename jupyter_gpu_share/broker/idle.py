"""Idle culling that knows a GPU, as rules.

A remote kernel is active while its host says a cell runs, or while one of its GPUs is in
use (the host's telemetry, above a few per cent): a training loop in a background thread
counts, a websocket's traffic does not. It is stopped once it has been idle for its
limit, warned a few minutes before; billing ends at the instant the limit was reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

GPU_BUSY_PCT = 5


def gpus_in_use(
    samples: Iterable[Mapping[str, Any]], indices: Iterable[int], busy_pct: int = GPU_BUSY_PCT
) -> bool:
    """Whether any of the session's GPUs (by index) reports use above ``busy_pct``."""
    wanted = set(indices)
    if not wanted:
        return False
    for sample in samples:
        used = sample.get("utilization_pct")
        if sample.get("index") in wanted and isinstance(used, int) and used > busy_pct:
            return True
    return False


def idle_state(now_us: int, active_us: int, limit_s: float, warning_s: float) -> tuple[str, int]:
    """Where an idle session stands: ("active" | "warn" | "stop", the instant its limit is
    reached). A limit of 0 or less never stops it."""
    stop_us = active_us + int(limit_s * 1_000_000)
    if limit_s <= 0:
        return "active", stop_us
    if now_us >= stop_us:
        return "stop", stop_us
    if now_us >= stop_us - int(max(0.0, warning_s) * 1_000_000):
        return "warn", stop_us
    return "active", stop_us


def warning_text(limit_s: float, stop_in_s: float) -> str:
    """What the notebook is told before its kernel is stopped for being idle."""
    return (
        f"gpu-share: this kernel has been idle (no cell running, its GPUs unused) and stops "
        f"in {max(0, round(stop_in_s / 60))} min at your idle limit of {_minutes(limit_s)}: "
        "run a cell to keep it; its files are brought back now"
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
