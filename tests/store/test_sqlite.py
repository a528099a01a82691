"""SQLite: settlements through Core statements, the writer's lock, WAL checkpoints."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from jupyter_gpu_share.store import OfferSpec, Store
from jupyter_gpu_share.store.checkpoint import WalCheckpointer

SECOND = 1_000_000
T0 = 1_700_000_000_000_000


def _settle_everything(store: Store) -> tuple[list, dict[str, int]]:
    """Settle single sessions and a batch, with repeats, and return records and balances."""
    for name, role in (("alice", "user"), ("bob", "host"), ("carol", "user")):
        store.ensure_account(name, role)
    store.credit("alice", 10**9)
    store.credit("carol", 10**9)
    (offer,) = store.replace_offers("bob", [OfferSpec("T4", 2, 15_360, (0, 1), 7)])
    sessions = [
        store.create_session(renter, renter, offer.id, T0 + number)
        for number, renter in enumerate(["alice", "carol"] * 4)
    ]
    for session in sessions[1:]:
        store.mark_ready(session.id, T0 + SECOND)
    records = [store.end_session(sessions[0].id, T0 + 9 * SECOND, "never ready", 1000)]
    records.append(store.end_session(sessions[1].id, T0 + 61 * SECOND + 1, "stopped", 1000))
    records.append(store.end_session(sessions[1].id, T0 + 99 * SECOND, "again", 0))
    endings = [(session.id, T0 + 30 * SECOND, "host lost") for session in sessions[1:]]
    records += store.end_sessions(endings + endings[:2], fee_bps=250)
    store.check_ledger()
    balances = {
        name: store.balance(name) for name in ("alice", "bob", "carol", "platform-fee", "mint")
    }
    # Session ids are random: compare records without them.
    return [record.__dict__ | {"id": None} for record in records], balances


def test_singles_repeats_and_batches_settle_once(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'settle.sqlite'}", upgrade=True) as store:
        records, balances = _settle_everything(store)
    assert [record["amount_micro"] for record in records[:3]] == [0, 61 * 7, 61 * 7]
    assert sum(balances.values()) == 0
    paid = 2 * 10**9 - balances["alice"] - balances["carol"]
    assert paid == balances["bob"] + balances["platform-fee"] == 61 * 7 + 6 * 29 * 7


def test_a_store_transaction_holds_the_write_lock_from_its_begin(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE first: a second writer cannot get in between a settlement's read
    and its write (the settlement would fail with SQLITE_BUSY at once)."""
    path = tmp_path / "lock.sqlite"
    with Store(f"sqlite:///{path}", upgrade=True) as store:
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            with store._write() as connection:
                connection.execute(select(1))  # only a read so far, and yet
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            other.execute("BEGIN IMMEDIATE")  # free again once it committed
            other.rollback()
        finally:
            other.close()


def test_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'wal.sqlite'}", upgrade=True)
    checkpointer = store._checkpointer
    assert isinstance(checkpointer, WalCheckpointer)
    assert any(thread.name == "gpu-share-wal-checkpoint" for thread in threading.enumerate())
    store.ensure_account("alice", "user")
    store.credit("alice", 1000)
    busy, frames, copied = checkpointer.checkpoint()
    assert (busy, copied) == (0, frames)
    store.close()
    assert not any(thread.name == "gpu-share-wal-checkpoint" for thread in threading.enumerate())


def test_memory_store_has_no_checkpointer() -> None:
    with Store("sqlite://", upgrade=True) as store:
        assert store._checkpointer is None
