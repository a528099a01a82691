"""Ledger rules: prices, billing and double-entry settlement (pure, no I/O)."""

from __future__ import annotations

from .rules import (
    MAX_FEE_BPS,
    MAX_MICRO,
    MICRO,
    UNLIMITED_SECONDS,
    Entry,
    billed_seconds,
    can_start,
    credit_entries,
    earnings_by_day,
    format_credits,
    parse_credits,
    parse_positive_credits,
    price_per_hour,
    price_per_second_from_hour,
    seconds_affordable,
    session_amount,
    settlement_entries,
    split_fee,
)

__all__ = [
    "MAX_FEE_BPS",
    "MAX_MICRO",
    "MICRO",
    "UNLIMITED_SECONDS",
    "Entry",
    "billed_seconds",
    "can_start",
    "credit_entries",
    "earnings_by_day",
    "format_credits",
    "parse_credits",
    "parse_positive_credits",
    "price_per_hour",
    "price_per_second_from_hour",
    "seconds_affordable",
    "session_amount",
    "settlement_entries",
    "split_fee",
]
