"""Per-token request rate limits: a token bucket per account, as plain data and functions.

Each account may make ``rate_per_minute`` API requests a minute on average, in bursts of up
to ``burst``; past that a request answers 429 with ``Retry-After`` (the seconds until one
request fits again). Only authenticated requests are counted, so the buckets are as many as
the accounts that use the API, never one per anonymous caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Bucket:
    """Requests an account may still make now, and when that was last computed."""

    tokens: float
    updated: float


def take(bucket: Bucket, now: float, rate_per_minute: int, burst: int) -> int | None:
    """Spend one request from ``bucket``; None when allowed, else the seconds to wait."""
    rate = rate_per_minute / 60.0
    bucket.tokens = min(float(burst), bucket.tokens + max(0.0, now - bucket.updated) * rate)
    bucket.updated = now
    if bucket.tokens >= 1.0:
        bucket.tokens -= 1.0
        return None
    return max(1, math.ceil((1.0 - bucket.tokens) / rate))


class RateLimiter:
    """The buckets of every account that made a request (``rate_per_minute`` 0: no limit)."""

    def __init__(self, rate_per_minute: int, burst: int) -> None:
        self.rate_per_minute = rate_per_minute
        self.burst = max(1, burst)
        self.buckets: dict[str, Bucket] = {}

    def check(self, account: str, now: float) -> int | None:
        """None when ``account`` may make a request now, else the seconds to wait."""
        if self.rate_per_minute <= 0:
            return None
        bucket = self.buckets.get(account)
        if bucket is None:
            bucket = self.buckets[account] = Bucket(float(self.burst), now)
        return take(bucket, now, self.rate_per_minute, self.burst)
