"""SQLite's direct settlement statements and background WAL checkpoints."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import Boolean, Column, Integer, MetaData, Table, bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from jupyter_gpu_share.store import OfferSpec, Store
from jupyter_gpu_share.store.checkpoint import WalCheckpointer
from jupyter_gpu_share.store.direct import DirectCursor, Prepared
from jupyter_gpu_share.store.engine import make_engine

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


def test_direct_and_core_statements_settle_alike(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'direct.sqlite'}", upgrade=True) as direct:
        assert direct._sqlite is not None
        expected = _settle_everything(direct)
    with Store(f"sqlite:///{tmp_path / 'core.sqlite'}", upgrade=True) as core:
        core._sqlite = None  # every statement through Connection.execute
        assert _settle_everything(core) == expected
    records, balances = expected
    assert [record["amount_micro"] for record in records[:3]] == [0, 61 * 7, 61 * 7]
    assert sum(balances.values()) == 0
    paid = 2 * 10**9 - balances["alice"] - balances["carol"]
    assert paid == balances["bob"] + balances["platform-fee"] == 61 * 7 + 6 * 29 * 7


def test_prepared_statements_refuse_types_that_need_conversion() -> None:
    engine = make_engine("sqlite://")
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("b", Boolean))
    with pytest.raises(ValueError, match="needs conversion"):
        Prepared(insert(table).values(b=bindparam("b")), engine.dialect)
    with pytest.raises(ValueError, match="needs conversion"):
        Prepared(select(table.c.b), engine.dialect)
    plain = Prepared(select(table.c.id).where(table.c.id == bindparam("wanted")), engine.dialect)
    assert plain.args({"wanted": 3}) == (3,)
    engine.dispose()


def test_direct_cursor_raises_sqlalchemy_errors(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'errors.sqlite'}")
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True))
    table.create(engine)
    statement = Prepared(insert(table).values(id=bindparam("id")), engine.dialect)
    with (
        pytest.raises(IntegrityError),
        engine.begin() as connection,
        DirectCursor(connection) as cursor,
    ):
        assert cursor.execute(statement, {"id": 1}) == 1
        cursor.executemany(statement, [{"id": 2}, {"id": 1}])
    with engine.connect() as connection:
        assert connection.execute(select(table.c.id)).all() == []  # rolled back
    engine.dispose()


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
