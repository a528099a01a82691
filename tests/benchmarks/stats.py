"""Small statistics helpers (no numpy)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def rnd(value: float | None, digits: int = 3) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(value, digits)


def median_difference_interval(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 1,
) -> tuple[float, float]:
    """A bootstrap interval for ``median(a) - median(b)``: how far the same code, measured
    again on the same machine, could put the difference. Each side is resampled on its own
    (a percentile bootstrap); ``seed`` makes the interval repeatable for the same samples."""
    if not a or not b:
        return math.nan, math.nan
    rng = random.Random(seed)
    differences = [
        median(rng.choices(a, k=len(a))) - median(rng.choices(b, k=len(b)))
        for _ in range(resamples)
    ]
    tail = (1 - confidence) / 2 * 100
    return percentile(differences, tail), percentile(differences, 100 - tail)


def paired_median_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of ``a[i] - b[i]``: the difference within each round of an interleaved
    run, so a slow spell of the machine that hits both sides of a round cancels out."""
    pairs = min(len(a), len(b))
    if not pairs:
        return math.nan
    return median([a[i] - b[i] for i in range(pairs)])
