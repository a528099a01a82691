"""Property tests: any mix of credits and settlements keeps the books balanced."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_gpu_share.ledger import split_fee
from jupyter_gpu_share.store import ENDED, OfferSpec, Store

SECOND = 1_000_000
T0 = 1_700_000_000_000_000
RENTERS = ("alice", "carol", "physics-101")
HOSTS = ("bob", "dave")

credits = st.tuples(
    st.just("credit"),
    st.sampled_from(RENTERS + HOSTS),
    st.integers(min_value=1, max_value=10**12),
)
sessions = st.tuples(
    st.just("session"),
    st.sampled_from(RENTERS),  # renter
    st.sampled_from(RENTERS),  # payer
    st.sampled_from(HOSTS),
    st.integers(min_value=0, max_value=10**6),  # price per second
    st.integers(min_value=0, max_value=10_000),  # fee in basis points
    st.none() | st.integers(min_value=0, max_value=5 * SECOND),  # ready after, or never
    st.one_of(  # how long it ran: zero, sub-second, a few seconds, hours, or negative
        st.just(0),
        st.integers(min_value=1, max_value=SECOND),
        st.integers(min_value=-SECOND, max_value=600 * SECOND),
        st.integers(min_value=0, max_value=10 * 3600 * SECOND),
    ),
    st.integers(min_value=1, max_value=3),  # how many times it is settled
)
operations = st.lists(st.one_of(credits, sessions), max_size=25)


@pytest.fixture(scope="module")
def template_database() -> Iterator[Path]:
    """Migrate one SQLite database that every example starts from a copy of."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "template.sqlite"
        with Store(f"sqlite:///{path}", upgrade=True) as store:
            for name in RENTERS:
                store.ensure_account(name, "user")
            for name in HOSTS:
                store.ensure_account(name, "host")
        yield path


def _balances(store: Store) -> dict[str, int]:
    names = (*RENTERS, *HOSTS, "platform-fee", "mint")
    return {name: store.balance(name) for name in names}


@settings(max_examples=50, deadline=None)
@given(operations=operations)
def test_books_always_balance(template_database: Path, operations: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "store.sqlite"
        shutil.copy(template_database, path)
        with Store(f"sqlite:///{path}") as store:
            _run(store, operations)


def _run(store: Store, operations: list[tuple]) -> None:
    clock = T0
    for operation in operations:
        clock += SECOND
        if operation[0] == "credit":
            _, account, amount = operation
            before = store.balance(account)
            store.credit(account, amount)
            assert store.balance(account) == before + amount
            continue

        _, renter, payer, host, price, fee_bps, ready_after, duration, settlements = operation
        (offer,) = store.replace_offers(host, [OfferSpec("GPU", 1, 1024, (0,), price)])
        session = store.create_session(renter, payer, offer.id, clock)
        ready_us = None
        if ready_after is not None:
            ready_us = clock + ready_after
            store.mark_ready(session.id, ready_us)
        ended_us = (ready_us or clock) + duration

        before = _balances(store)
        first = store.end_session(session.id, ended_us, "stopped", fee_bps)
        after = _balances(store)

        if ready_us is None or ended_us <= ready_us:
            expected_seconds = 0
        else:
            expected_seconds = -(-(ended_us - ready_us) // SECOND)
        assert first.state == ENDED
        assert first.billed_seconds == expected_seconds
        assert first.amount_micro == expected_seconds * price
        host_share, fee = split_fee(first.amount_micro, fee_bps)
        debit = before[payer] - after[payer]
        host_credit = after[host] - before[host]
        fee_credit = after["platform-fee"] - before["platform-fee"]
        assert debit == first.amount_micro
        assert host_credit == host_share
        assert fee_credit == fee
        assert host_credit + fee_credit == debit
        assert sum(after.values()) == 0

        for repeat in range(settlements - 1):
            again = store.end_session(
                session.id, ended_us + (repeat + 1) * 7 * SECOND, "again", 10_000 - fee_bps
            )
            assert again == first
            assert _balances(store) == after

    store.check_ledger()
    for name, balance in _balances(store).items():
        assert store.entries_sum(name) == balance
