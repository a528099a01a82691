"""Money rules: parsing, prices, billing and double-entry settlement.

Pure functions over integers. Money is micro-credits (1 credit = ``MICRO``), prices are
stored per second and shown per hour, times are integer microseconds since the epoch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext

MICRO = 1_000_000
"""Micro-credits in one credit."""

MICROSECONDS_PER_SECOND = 1_000_000
SECONDS_PER_HOUR = 3600
MAX_FEE_BPS = 10_000
MAX_MICRO = 2**63 - 1
"""The largest amount a BIGINT column holds."""

UNLIMITED_SECONDS = 2**62
"""What ``seconds_affordable`` answers for a free offer."""

_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_credits(text: str) -> int:
    """Parse a decimal number of credits such as ``"12.5"`` into micro-credits."""
    if not isinstance(text, str):
        raise ValueError(f"credits must be given as a decimal string, not {type(text).__name__}")
    stripped = text.strip()
    if not _DECIMAL_TEXT.fullmatch(stripped):
        raise ValueError(f"not a decimal number of credits: {text!r}")
    with localcontext() as context:
        # Enough precision that scaling by 10**6 is exact for any input length.
        context.prec = len(stripped) + 12
        try:
            value = Decimal(stripped)
        except InvalidOperation as exc:  # pragma: no cover - the pattern admits only numbers
            raise ValueError(f"not a decimal number of credits: {text!r}") from exc
        if not value.is_finite():  # pragma: no cover - the pattern rejects NaN and infinity
            raise ValueError(f"credits must be a finite number: {text!r}")
        micro = value.scaleb(6)
    if micro != micro.to_integral_value():
        raise ValueError(f"credits have at most 6 decimal places (1 micro-credit): {text!r}")
    result = int(micro)
    if abs(result) > MAX_MICRO:
        raise ValueError(f"amount of credits is too large: {text!r}")
    return result


def parse_positive_credits(text: str) -> int:
    """Parse a decimal number of credits that must be greater than zero."""
    micro = parse_credits(text)
    if micro <= 0:
        raise ValueError(f"amount of credits must be greater than zero: {text!r}")
    return micro


def format_credits(micro: int) -> str:
    """Format micro-credits as credits with at least two decimals, e.g. ``"12.50"``."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    decimals = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{decimals}"


def price_per_second_from_hour(per_hour_micro: int) -> int:
    """Convert an hourly price to micro-credits per second, rounding half up."""
    if per_hour_micro < 0:
        raise ValueError(f"price must not be negative: {per_hour_micro}")
    per_second = (per_hour_micro + SECONDS_PER_HOUR // 2) // SECONDS_PER_HOUR
    if per_second == 0 and per_hour_micro > 0:
        return 1
    return per_second


def price_per_hour(per_second_micro: int) -> int:
    """Convert a per-second price to micro-credits per hour."""
    return per_second_micro * SECONDS_PER_HOUR


def billed_seconds(start_us: int, end_us: int) -> int:
    """Return the whole seconds billed from ``start_us`` to ``end_us``, rounding up."""
    if end_us <= start_us:
        return 0
    return -(-(end_us - start_us) // MICROSECONDS_PER_SECOND)


def session_amount(seconds: int, price_per_second_micro: int) -> int:
    """Return the cost of ``seconds`` at a per-second price."""
    if seconds < 0:
        raise ValueError(f"billed seconds must not be negative: {seconds}")
    if price_per_second_micro < 0:
        raise ValueError(f"price must not be negative: {price_per_second_micro}")
    return seconds * price_per_second_micro


def _check_fee_bps(fee_bps: int) -> None:
    if not 0 <= fee_bps <= MAX_FEE_BPS:
        raise ValueError(f"fee must be between 0 and {MAX_FEE_BPS} basis points: {fee_bps}")


def split_fee(amount_micro: int, fee_bps: int) -> tuple[int, int]:
    """Split an amount into ``(host_share, fee)``; the fee rounds down."""
    _check_fee_bps(fee_bps)
    if amount_micro < 0:
        raise ValueError(f"amount must not be negative: {amount_micro}")
    fee = amount_micro * fee_bps // MAX_FEE_BPS
    return amount_micro - fee, fee


@dataclass(frozen=True)
class Entry:
    """One line of a double-entry transaction: an account and a signed amount."""

    account: str
    amount_micro: int


def settlement_entries(
    payer: str, host: str, fee_account: str, amount_micro: int, fee_bps: int
) -> list[Entry]:
    """Return the entries that move a session's amount from payer to host and fee account."""
    host_share, fee = split_fee(amount_micro, fee_bps)
    if amount_micro == 0:
        return []
    entries = [Entry(payer, -amount_micro)]
    if host_share:
        entries.append(Entry(host, host_share))
    if fee:
        entries.append(Entry(fee_account, fee))
    return entries


def credit_entries(source: str, account: str, amount_micro: int) -> list[Entry]:
    """Return the entries that move a positive amount from ``source`` to ``account``."""
    if amount_micro <= 0:
        raise ValueError(f"amount to credit must be greater than zero: {amount_micro}")
    return [Entry(source, -amount_micro), Entry(account, amount_micro)]


def seconds_affordable(balance_micro: int, price_per_second_micro: int) -> int:
    """Return how many whole seconds a balance pays for at a per-second price."""
    if price_per_second_micro < 0:
        raise ValueError(f"price must not be negative: {price_per_second_micro}")
    if price_per_second_micro == 0:
        return UNLIMITED_SECONDS
    if balance_micro <= 0:
        return 0
    return balance_micro // price_per_second_micro


def can_start(balance_micro: int, price_per_second_micro: int, minimum_seconds: int = 60) -> bool:
    """Tell whether a balance pays for at least ``minimum_seconds`` at a price."""
    return seconds_affordable(balance_micro, price_per_second_micro) >= minimum_seconds


def earnings_by_day(settled: list[tuple[int, int, int]]) -> list[dict[str, object]]:
    """Sum (ended_us, billed_seconds, earned_micro) rows per UTC day, newest day first."""
    from datetime import datetime, timezone

    days: dict[str, dict[str, int]] = {}
    for ended_us, seconds, earned in settled:
        day = datetime.fromtimestamp(ended_us / 1_000_000, tz=timezone.utc).date().isoformat()
        total = days.setdefault(day, {"sessions": 0, "billed_seconds": 0, "earned_micro": 0})
        total["sessions"] += 1
        total["billed_seconds"] += seconds or 0
        total["earned_micro"] += earned
    return [{"day": day, **days[day]} for day in sorted(days, reverse=True)]


def credit_runs_out_us(balance_micro: int, running: Iterable[tuple[int, int]]) -> int | None:
    """The instant a payer's running sessions, as ``(ready_us, price_per_second_micro)``,
    together cost exactly (unrounded) its balance; None when nothing of it bills.

    Each session costs ``(t - ready_us) * price / 10^6`` at instant ``t``: the sum reaches
    the balance at ``(balance * 10^6 + sum(ready_us * price)) / sum(price)``, floored so the
    stop comes at or before that instant, never after.
    """
    rate = weighted_start = 0
    for ready_us, price in running:
        rate += price
        weighted_start += ready_us * price
    if rate <= 0:
        return None
    return (balance_micro * MICROSECONDS_PER_SECOND + weighted_start) // rate


def stop_instant_us(asked_us: int, ready_us: int | None) -> int:
    """Where billing of a stop asked at ``asked_us`` ends: then, never before billing began."""
    return asked_us if ready_us is None else max(asked_us, ready_us)


def bill(ready_us: int | None, ended_us: int, price_per_second_micro: int) -> tuple[int, int]:
    """What a session that ends at ``ended_us`` is billed: ``(seconds, amount)``. Nothing
    if it never became ready; else every started second, at its price."""
    if ready_us is None:
        return 0, 0
    seconds = billed_seconds(ready_us, ended_us)
    return seconds, session_amount(seconds, price_per_second_micro)


def cost_at(ready_us: int | None, at_us: int, price_per_second_micro: int) -> int:
    """What a session costs so far at ``at_us``: what a stop then would bill."""
    return bill(ready_us, at_us, price_per_second_micro)[1]
