"""Receipts in the store: written with each settlement, chained, even with two brokers."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, text

from jupyter_gpu_share.ledger import receipts
from jupyter_gpu_share.store import NotFound, OfferSpec, Store
from jupyter_gpu_share.store.engine import make_engine

SECOND = 1_000_000
T0 = 1_700_000_000_000_000
PRICE = 278
KEY = Ed25519PrivateKey.generate()
SIGNER = functools.partial(receipts.sign, private_key=KEY)


@pytest.fixture
def signed(store_url: str) -> Iterator[Store]:
    """A migrated store that signs receipts, with a user, a host, an offer and some credit."""
    with Store(store_url, upgrade=True, signer=SIGNER) as opened:
        opened.ensure_account("alice", "user")
        opened.ensure_account("bob", "host")
        opened.credit("alice", 10**12, memo="starter credit")
        opened.replace_offers("bob", [OfferSpec("RTX 4090", 1, 24_564, (0,), PRICE)])
        yield opened


@pytest.fixture
def database(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def _running(store: Store, count: int, never_ready_every: int = 0) -> list[str]:
    offer_id = store.list_offers()[0].id
    ids = []
    for index in range(count):
        session = store.create_session("alice", "alice", offer_id, T0)
        if not never_ready_every or index % never_ready_every:
            store.mark_ready(session.id, T0)
        ids.append(session.id)
    return ids


def _chain(store: Store) -> list[dict]:
    found, after = [], 0
    while page := store.list_receipts(after, 7):
        found += page
        after = page[-1]["sequence"]
    return found


def test_a_settlement_writes_its_receipt(signed: Store) -> None:
    (session_id,) = _running(signed, 1)
    with pytest.raises(NotFound):
        signed.get_receipt(session_id)
    ended = signed.end_session(session_id, T0 + 9_500_000, "stopped", 1000)
    receipt = signed.get_receipt(session_id)
    assert receipts.verify(receipt, KEY.public_key()) == []
    assert receipt["billed_seconds"] == ended.billed_seconds == 10
    assert receipt["amount_micro"] == ended.amount_micro == 10 * PRICE
    assert receipt["host_micro"] == signed.balance("bob")
    assert receipt["fee_micro"] == signed.balance("platform-fee")
    assert (receipt["renter"], receipt["payer"], receipt["host"]) == ("alice", "alice", "bob")
    assert (receipt["sequence"], receipt["prev_hash"]) == (1, receipts.GENESIS_HASH)
    assert isinstance(receipt["transaction_id"], int)
    # Settling again changes nothing, and writes no second receipt.
    signed.end_session(session_id, T0 + 60 * SECOND, "stopped", 1000)
    assert signed.list_receipts() == [receipt]


def test_a_session_that_never_started_gets_a_receipt_of_nothing(signed: Store) -> None:
    session = signed.create_session("alice", "alice", signed.list_offers()[0].id, T0)
    signed.end_session(session.id, T0 + SECOND, "start failed", 1000)
    receipt = signed.get_receipt(session.id)
    assert receipt["started_us"] is None and receipt["amount_micro"] == 0
    assert receipt["transaction_id"] is None
    assert receipts.verify(receipt, KEY.public_key()) == []


def test_many_settlements_make_one_chain(signed: Store) -> None:
    ids = _running(signed, 30)
    for index, session_id in enumerate(ids[:10]):
        signed.end_session(session_id, T0 + (index + 1) * SECOND, "stopped", 1000)
    signed.end_sessions([(sid, T0 + 5 * SECOND, "host lost") for sid in ids[10:]], 1000)
    chain = _chain(signed)
    assert [r["sequence"] for r in chain] == list(range(1, 31))
    assert [r["session_id"] for r in chain] == ids
    assert receipts.chain_problems(chain) == []
    assert all(receipts.verify(r, KEY.public_key()) == [] for r in chain)
    signed.check_ledger()


def test_the_stored_row_matches_the_receipt(signed: Store, database: Engine) -> None:
    ids = _running(signed, 2)
    signed.end_sessions([(sid, T0 + SECOND, "stopped") for sid in ids], 1000)
    with database.connect() as connection:
        rows = connection.execute(
            text("SELECT sequence, session_id, key_id, prev_hash, body FROM receipts")
        ).all()
    first, second = sorted(rows)
    assert json.loads(second.body)["prev_hash"] == second.prev_hash
    assert second.prev_hash == receipts.receipt_hash(json.loads(first.body))
    assert first.body.encode() == receipts.canonical_bytes(json.loads(first.body))
    assert first.key_id == receipts.key_id(KEY.public_key())


def test_a_failed_receipt_rolls_the_settlement_back(store_url: str, signed: Store) -> None:
    (session_id,) = _running(signed, 1)

    def broken(body: dict) -> dict:
        raise RuntimeError("the signer failed")

    with Store(store_url, signer=broken) as other, pytest.raises(RuntimeError):
        other.end_session(session_id, T0 + SECOND, "stopped", 1000)
    assert signed.get_session(session_id).state == "running"
    assert signed.balance("bob") == 0
    signed.check_ledger()


def test_without_a_signer_settlements_get_no_receipt_and_say_so_once(
    store_url: str, signed: Store, caplog: pytest.LogCaptureFixture
) -> None:
    ids = _running(signed, 2)
    with Store(store_url) as unsigned, caplog.at_level("WARNING", "jupyter_gpu_share.store"):
        for session_id in ids:
            unsigned.end_session(session_id, T0 + SECOND, "stopped", 1000)
    assert [r.message for r in caplog.records].count(
        "settlements get no receipts: the store was given no signing key"
    ) == 1
    assert signed.list_receipts() == []


def test_two_brokers_settling_at_once_keep_one_chain(store_url: str, signed: Store) -> None:
    # A third never start: settling them moves no money, so locks no account row.
    ids = _running(signed, 60, never_ready_every=3)
    replicas = [Store(store_url, signer=SIGNER), Store(store_url, signer=SIGNER)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def settle(number: int) -> None:
        try:
            barrier.wait(timeout=30)
            # Each takes half the sessions, one by one or in batches, and some of the
            # other's too: those were settled already, or are settled once.
            mine = ids[number::2] + ids[: len(ids) // 4]
            for start in range(0, len(mine), 3):
                batch = mine[start : start + 3]
                if number == 0:
                    for session_id in batch:
                        replicas[number].end_session(session_id, T0 + SECOND, "stopped", 1000)
                else:
                    replicas[number].end_sessions(
                        [(sid, T0 + 2 * SECOND, "stopped") for sid in batch], 1000
                    )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=settle, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for replica in replicas:
        replica.close()
    assert not errors, errors
    chain = _chain(signed)
    assert sorted(r["session_id"] for r in chain) == sorted(ids)
    assert receipts.chain_problems(chain) == []
    for receipt in chain:
        assert receipts.verify(receipt, KEY.public_key()) == []
        assert receipt["amount_micro"] == signed.get_session(receipt["session_id"]).amount_micro
    signed.check_ledger()


def test_list_receipts_pages_in_sequence_order(signed: Store) -> None:
    ids = _running(signed, 5)
    signed.end_sessions([(sid, T0 + SECOND, "stopped") for sid in ids], 0)
    assert [r["sequence"] for r in signed.list_receipts(2, 2)] == [3, 4]
    assert signed.list_receipts(5) == []
    with pytest.raises(ValueError, match="limit"):
        signed.list_receipts(0, 0)


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
def test_settlement_cost(store_url: str, signing: bool) -> None:
    """Time 1000 settlements one by one (printed with -s); the receipt must stay cheap."""
    with Store(store_url, upgrade=True, signer=SIGNER if signing else None) as store:
        store.ensure_account("alice", "user")
        store.ensure_account("bob", "host")
        store.credit("alice", 10**12)
        store.replace_offers("bob", [OfferSpec("RTX 4090", 1, 24_564, (0,), PRICE)])
        ids = _running(store, 1000)
        started = time.perf_counter()
        for session_id in ids:
            store.end_session(session_id, T0 + 3 * SECOND, "stopped", 1000)
        elapsed = time.perf_counter() - started
        print(f"\n1000 settlements, {'with' if signing else 'without'} receipts: {elapsed:.3f} s")
        assert len(store.list_receipts()) == (1000 if signing else 0)
