"""Unit tests of the ledger's money rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jupyter_gpu_share.broker.matching import OfferView, SessionRequest, offer_fits
from jupyter_gpu_share.ledger import (
    MICRO,
    UNLIMITED_SECONDS,
    Entry,
    billed_seconds,
    can_start,
    cost_at,
    credit_entries,
    credit_runs_out_us,
    format_credits,
    parse_credits,
    parse_positive_credits,
    price_per_hour,
    price_per_second_from_hour,
    seconds_affordable,
    session_amount,
    settlement_entries,
    split_fee,
    stop_instant_us,
)


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("12.5", 12_500_000),
        ("1", MICRO),
        ("0", 0),
        ("0.000001", 1),
        ("1.000000", MICRO),
        ("1.0000000", MICRO),
        (" 7 ", 7 * MICRO),
        (".5", 500_000),
        ("5.", 5 * MICRO),
        ("+2", 2 * MICRO),
        ("-3.25", -3_250_000),
        ("9223372036854.775807", 2**63 - 1),
    ],
)
def test_parse_credits(text: str, micro: int) -> None:
    assert parse_credits(text) == micro


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a decimal number"),
        ("abc", "not a decimal number"),
        ("NaN", "not a decimal number"),
        ("inf", "not a decimal number"),
        ("-Infinity", "not a decimal number"),
        ("1e3", "not a decimal number"),
        ("1_000", "not a decimal number"),
        ("1,5", "not a decimal number"),
        ("1.2.3", "not a decimal number"),
        ("0.0000001", "at most 6 decimal places"),
        ("1.0000000000000000000000000001", "at most 6 decimal places"),
        ("9223372036854.775808", "too large"),
        ("1" * 40, "too large"),
    ],
)
def test_parse_credits_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_credits(text)


def test_parse_credits_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="decimal string"):
        parse_credits(1.5)  # type: ignore[arg-type]


def test_parse_positive_credits() -> None:
    assert parse_positive_credits("0.000001") == 1
    for text in ("0", "-1", "0.000000"):
        with pytest.raises(ValueError, match="greater than zero"):
            parse_positive_credits(text)


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (12_500_000, "12.50"),
        (1_234, "0.001234"),
        (0, "0.00"),
        (MICRO, "1.00"),
        (1, "0.000001"),
        (1_234_567, "1.234567"),
        (10_000, "0.01"),
        (100_000, "0.10"),
        (-500_000, "-0.50"),
        (-1, "-0.000001"),
    ],
)
def test_format_credits(micro: int, text: str) -> None:
    assert format_credits(micro) == text
    assert parse_credits(text) == micro


@pytest.mark.parametrize(
    ("per_hour", "per_second"),
    [
        (0, 0),
        (1, 1),  # positive never rounds to free
        (1799, 1),
        (3600, 1),
        (5399, 1),
        (5400, 2),  # half rounds up
        (7200, 2),
        (3_600_000_000, 1_000_000),
    ],
)
def test_price_per_second_from_hour(per_hour: int, per_second: int) -> None:
    assert price_per_second_from_hour(per_hour) == per_second


def test_price_conversions() -> None:
    with pytest.raises(ValueError, match="negative"):
        price_per_second_from_hour(-1)
    assert price_per_hour(278) == 1_000_800
    assert price_per_second_from_hour(price_per_hour(278)) == 278


@pytest.mark.parametrize(
    ("start", "end", "seconds"),
    [
        (0, 0, 0),
        (10, 5, 0),
        (0, 1, 1),
        (0, 999_999, 1),
        (0, 1_000_000, 1),
        (0, 1_000_001, 2),
        (1_700_000_000_000_000, 1_700_000_060_000_000, 60),
        (1_700_000_000_000_001, 1_700_000_060_000_000, 60),
    ],
)
def test_billed_seconds_rounds_up(start: int, end: int, seconds: int) -> None:
    assert billed_seconds(start, end) == seconds


def test_session_amount() -> None:
    assert session_amount(60, 278) == 16_680
    assert session_amount(0, 278) == 0
    with pytest.raises(ValueError):
        session_amount(-1, 1)
    with pytest.raises(ValueError):
        session_amount(1, -1)


@pytest.mark.parametrize(
    ("amount", "bps", "split"),
    [
        (1000, 1000, (900, 100)),
        (999, 1000, (900, 99)),  # the fee rounds down, the host gets the remainder
        (1, 9999, (1, 0)),
        (1000, 0, (1000, 0)),
        (1000, 10_000, (0, 1000)),
        (0, 500, (0, 0)),
    ],
)
def test_split_fee(amount: int, bps: int, split: tuple[int, int]) -> None:
    assert split_fee(amount, bps) == split


@pytest.mark.parametrize("bps", [-1, 10_001])
def test_split_fee_rejects_bad_fee(bps: int) -> None:
    with pytest.raises(ValueError, match="basis points"):
        split_fee(100, bps)


def test_split_fee_rejects_negative_amount() -> None:
    with pytest.raises(ValueError, match="negative"):
        split_fee(-1, 100)


def test_settlement_entries() -> None:
    entries = settlement_entries("alice", "bob", "platform-fee", 1000, 1500)
    assert entries == [
        Entry("alice", -1000),
        Entry("bob", 850),
        Entry("platform-fee", 150),
    ]
    assert sum(entry.amount_micro for entry in entries) == 0


def test_settlement_entries_omit_zero_lines() -> None:
    assert settlement_entries("alice", "bob", "fee", 0, 1500) == []
    assert settlement_entries("alice", "bob", "fee", 10, 0) == [
        Entry("alice", -10),
        Entry("bob", 10),
    ]
    assert settlement_entries("alice", "bob", "fee", 10, 10_000) == [
        Entry("alice", -10),
        Entry("fee", 10),
    ]
    with pytest.raises(ValueError):
        settlement_entries("alice", "bob", "fee", 10, 10_001)


def test_credit_entries() -> None:
    assert credit_entries("mint", "alice", 5) == [Entry("mint", -5), Entry("alice", 5)]
    for amount in (0, -5):
        with pytest.raises(ValueError, match="greater than zero"):
            credit_entries("mint", "alice", amount)


def test_entry_is_frozen() -> None:
    entry = Entry("alice", 1)
    with pytest.raises(AttributeError):
        entry.amount_micro = 2  # type: ignore[misc]


def test_seconds_affordable_and_can_start() -> None:
    assert seconds_affordable(1000, 278) == 3
    assert seconds_affordable(0, 278) == 0
    assert seconds_affordable(-5, 278) == 0
    assert seconds_affordable(-5, 0) == UNLIMITED_SECONDS
    with pytest.raises(ValueError):
        seconds_affordable(10, -1)
    assert can_start(60 * 278, 278)
    assert not can_start(60 * 278 - 1, 278)
    assert can_start(0, 0)
    assert can_start(278, 278, minimum_seconds=1)
    assert can_start(0, 278, minimum_seconds=0)


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=1, max_value=10**6))
def test_an_offer_at_a_renters_hourly_cap_matches_it(per_hour: int, above: int) -> None:
    """Hosts' prices and renters' caps go through one conversion (round half up; the
    handlers used // 3600 for caps): an offer at X/h is never filtered out by a cap of X/h,
    and one a whole micro-credit a second dearer always is."""
    offer = OfferView(1, "h", "CPU", 0, 0, price_per_second_from_hour(per_hour))
    cap = SessionRequest(max_price_per_second_micro=price_per_second_from_hour(per_hour))
    assert offer_fits(offer, cap)
    dearer = OfferView(1, "h", "CPU", 0, 0, offer.price_per_second_micro + above)
    assert not offer_fits(dearer, cap)


@given(
    st.integers(min_value=0, max_value=10**15),
    st.integers(min_value=0, max_value=10**15),
    st.integers(min_value=0, max_value=10**7),
)
def test_billing_is_ceil_seconds_times_price(start: int, length: int, price: int) -> None:
    seconds = billed_seconds(start, start + length)
    assert seconds * 1_000_000 >= length > (seconds - 1) * 1_000_000 or length == seconds == 0
    assert session_amount(seconds, price) == seconds * price


running_sessions = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10**16),  # ready_us
        st.integers(min_value=0, max_value=10**6),  # price per second
    ),
    max_size=8,
)


@given(st.integers(min_value=0, max_value=10**15), running_sessions)
def test_credit_runs_out_at_the_last_instant_the_balance_covers(
    balance: int, running: list[tuple[int, int]]
) -> None:
    """At the instant found, the sessions' exact cost is within the balance; a microsecond
    later it is not (or nothing bills, and there is no such instant)."""
    out = credit_runs_out_us(balance, running)
    if sum(price for _, price in running) == 0:
        assert out is None
        return
    assert out is not None

    def exact_cost_times_million(at_us: int) -> int:  # micro-credits x 10^6, no rounding
        return sum((at_us - ready) * price for ready, price in running)

    assert exact_cost_times_million(out) <= balance * 1_000_000
    assert exact_cost_times_million(out + 1) > balance * 1_000_000


def test_credit_runs_out_for_one_session() -> None:
    # 1 credit at 1000 micro-credits a second: 1000 s after it became ready.
    assert credit_runs_out_us(MICRO, [(5_000_000, 1000)]) == 5_000_000 + 1000 * 1_000_000
    assert credit_runs_out_us(MICRO, []) is None
    assert credit_runs_out_us(MICRO, [(0, 0)]) is None


@given(st.integers(min_value=0, max_value=10**16), st.none() | st.integers(0, 10**16))
def test_a_stop_never_bills_before_the_session_was_ready(asked: int, ready: int | None) -> None:
    instant = stop_instant_us(asked, ready)
    assert instant >= asked
    if ready is not None:
        assert instant >= ready and instant in (asked, ready)
        assert cost_at(ready, instant, 1000) >= 0


@given(
    st.integers(min_value=0, max_value=10**16),
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**6),
)
def test_cost_so_far_is_what_a_stop_then_would_bill(ready: int, length: int, price: int) -> None:
    """What the API shows as the cost so far is exactly the settlement of a stop then."""
    assert cost_at(ready, ready + length, price) == session_amount(
        billed_seconds(ready, ready + length), price
    )
    assert cost_at(None, ready + length, price) == 0
    # Never more than ceil(lifetime) seconds at the price.
    assert cost_at(ready, ready + length, price) <= -(-length // 1_000_000) * price
