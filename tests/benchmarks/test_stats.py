"""The benchmark's statistics: what the figures in the README are computed with."""

from __future__ import annotations

import math
import random

from tests.benchmarks.stats import (
    median,
    median_difference_interval,
    paired_median_difference,
    percentile,
)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0, 1.0], 0) == 1.0
    assert percentile([5.0, 1.0], 100) == 5.0
    assert math.isnan(median([]))


def test_interval_holds_the_true_shift_and_narrows_with_more_samples() -> None:
    rng = random.Random(7)

    def sample(n: int, shift: float) -> list[float]:
        return [shift + rng.expovariate(1.0) for _ in range(n)]

    low_small, high_small = median_difference_interval(sample(100, 1.0), sample(100, 0.0))
    low_large, high_large = median_difference_interval(sample(2000, 1.0), sample(2000, 0.0))
    assert low_small < 1.0 < high_small
    assert low_large < 1.0 < high_large
    assert high_large - low_large < (high_small - low_small) / 2


def test_interval_is_repeatable_and_ordered() -> None:
    a, b = [3.0, 4.0, 5.0, 9.0], [1.0, 1.5, 2.0, 2.5]
    assert median_difference_interval(a, b) == median_difference_interval(a, b)
    low, high = median_difference_interval(a, b)
    assert low <= median(a) - median(b) <= high
    assert all(math.isnan(x) for x in median_difference_interval([], b))


def test_paired_difference_cancels_what_both_sides_of_a_round_share() -> None:
    drift = [0.0, 10.0, 0.0, 10.0, 0.0]  # a slow spell in rounds 1 and 3
    local = [5.0 + d for d in drift]
    remote = [6.0 + d for d in drift]
    assert paired_median_difference(remote, local) == 1.0
    assert median(remote) - median(local) == 1.0
    assert paired_median_difference(remote, local[:3]) == 1.0  # pairs only where both exist
    assert math.isnan(paired_median_difference([], local))
