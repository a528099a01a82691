"""Tests of the store: migrations, accounts, tokens, offers, sessions and settlement."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError

from jupyter_gpu_share.store import (
    ENDED,
    RUNNING,
    STARTING,
    Conflict,
    InsufficientFunds,
    NotFound,
    OfferSpec,
    Store,
    StoreError,
    migrations_config,
)
from jupyter_gpu_share.store import store as store_module
from jupyter_gpu_share.store.engine import make_engine
from jupyter_gpu_share.store.models import VERSION_TABLE, Base

SECOND = 1_000_000
T0 = 1_700_000_000_000_000
PRICE = 278  # about 1 credit per hour


@pytest.fixture
def database(store_url: str) -> Iterator[Engine]:
    """Give a test its own engine on the store's database, to look behind the API."""
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def offer_id(store: Store) -> int:
    """Offer bob's GPU 0 and return the offer's id."""
    (offer,) = store.replace_offers("bob", [OfferSpec("RTX 4090", 1, 24_564, (0,), PRICE)])
    return offer.id


def _count(engine: Engine, table: str, where: str = "1=1", **params: object) -> int:
    with engine.connect() as connection:
        return connection.execute(
            text(f"SELECT COUNT(*) FROM {table} WHERE {where}"), params
        ).scalar_one()


# -- schema ---------------------------------------------------------------------------


def test_migrations_create_the_models_schema(store: Store, database: Engine) -> None:
    with database.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_heads() == ("0008",)


def test_upgrade_from_0001_keeps_data_and_adds_classes(store_url: str, store: Store) -> None:
    command.downgrade(migrations_config(store_url), "0001")
    with pytest.raises(StoreError, match="out of date"):
        Store(store_url)
    with Store(store_url, upgrade=True) as upgraded:
        assert upgraded.balance("alice") == 1_000_000_000
        upgraded.ensure_account("prof", "teacher")
        assert upgraded.create_class("c1", "prof", quota_seconds=60).account == "c1@class"
        upgraded.check_ledger()


def test_fresh_database_is_migrated_without_upgrade(store_url: str) -> None:
    with Store(store_url) as store:
        assert store.get_account("mint").role == "system"
        assert store.get_account("platform-fee").role == "system"
        store.check_ledger()


def test_out_of_date_schema_is_refused_without_upgrade(store_url: str, store: Store) -> None:
    command.stamp(migrations_config(store_url), "base")
    with pytest.raises(StoreError, match="out of date; run: jupyter gpu-share broker --upgrade-db"):
        Store(store_url)


def test_upgrade_migrates_an_emptied_database(store_url: str, store: Store) -> None:
    command.downgrade(migrations_config(store_url), "base")
    with Store(store_url, upgrade=True) as upgraded:
        assert upgraded.get_account("alice") is None
        assert upgraded.get_account("mint") is not None


def test_newer_schema_is_refused(store_url: str, store: Store, database: Engine) -> None:
    with database.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'"))
    with pytest.raises(StoreError, match="newer than this version"):
        Store(store_url, upgrade=True)


def test_reopening_keeps_data(store_url: str, store: Store) -> None:
    with Store(store_url) as reopened:
        assert reopened.balance("alice") == 1_000_000_000
        assert reopened.get_account("mint").id == store.get_account("mint").id


def test_sqlite_pragmas(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'pragmas.sqlite'}")
    try:
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert pragma("PRAGMA busy_timeout").scalar() > 0
    finally:
        engine.dispose()


def test_in_memory_sqlite_store() -> None:
    with Store("sqlite://") as store:
        store.ensure_account("carol", "user")
        store.credit("carol", 5)
        assert store.balance("carol") == 5
        store.check_ledger()


# -- accounts -------------------------------------------------------------------------


def test_ensure_account(store: Store) -> None:
    created = store.ensure_account("carol@example.org", "teacher")
    assert created.role == "teacher"
    assert created.balance_micro == 0
    assert store.ensure_account("carol@example.org", "teacher") == created
    assert store.get_account("carol@example.org") == created
    assert store.get_account_by_id(created.id) == created
    assert store.get_account("nobody") is None
    with pytest.raises(NotFound):
        store.get_account_by_id(10_000)


def test_ensure_account_with_another_role_conflicts(store: Store) -> None:
    with pytest.raises(Conflict, match="role 'user'"):
        store.ensure_account("alice", "admin")
    with pytest.raises(Conflict):
        store.ensure_account("mint", "user")


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "semi;colon", "ünï", None])
def test_ensure_account_rejects_bad_names(store: Store, name: str) -> None:
    with pytest.raises(ValueError, match="account name"):
        store.ensure_account(name, "user")


def test_ensure_account_rejects_bad_roles(store: Store) -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        store.ensure_account("carol", "superuser")


# -- tokens ---------------------------------------------------------------------------


def test_tokens_are_stored_hashed(store: Store, database: Engine) -> None:
    token = store.issue_token("alice")
    assert token.startswith("gs_") and len(token) == 3 + 43  # 32 random bytes
    digest = hashlib.sha256(token.encode()).hexdigest()
    with database.connect() as connection:
        rows = connection.execute(text("SELECT prefix, sha256 FROM tokens")).all()
    # Named by its digest's first hex digits: no character of the secret is stored.
    assert rows == [(digest[:8], digest)]
    assert token[3:11] not in "".join(rows[0])
    assert store.authenticate(token).name == "alice"
    assert store.issue_token("alice") != token


def test_tokens_never_begin_with_a_dash(store: Store) -> None:
    issued = [store.issue_token("alice") for _ in range(300)]
    assert all(t.startswith("gs_") and re.fullmatch(r"gs_[A-Za-z0-9_-]{43}", t) for t in issued)
    assert all(store.authenticate(t).name == "alice" for t in issued[:20])


def test_tokens_issued_before_0004_keep_working(store_url: str, store: Store) -> None:
    command.downgrade(migrations_config(store_url), "0003")
    legacy = "-" + "a" * 42  # the old form: any token_urlsafe(32), a leading dash included
    engine = make_engine(store_url)
    try:
        with engine.begin() as connection:
            alice = connection.execute(text("SELECT id FROM accounts WHERE name = 'alice'"))
            connection.execute(
                text(
                    "INSERT INTO tokens (account_id, prefix, sha256, created_us) "
                    "VALUES (:account_id, :prefix, :sha256, :created_us)"
                ),
                {
                    "account_id": alice.scalar_one(),
                    "prefix": legacy[:8],
                    "sha256": hashlib.sha256(legacy.encode()).hexdigest(),
                    "created_us": T0,
                },
            )
    finally:
        engine.dispose()
    with Store(store_url, upgrade=True) as upgraded:
        assert upgraded.authenticate(legacy).name == "alice"
        (record,) = upgraded.list_tokens("alice")
        assert record.state == "active" and record.expires_us is None
        assert upgraded.revoke_tokens("alice") == 1
        assert upgraded.authenticate(legacy) is None


def test_tokens_expire(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [T0]
    monkeypatch.setattr(store_module.clock, "now_us", lambda: now[0])
    short = store.issue_token("alice", expires_in_s=60)
    forever = store.issue_token("alice")
    now[0] = T0 + 59 * SECOND
    assert store.authenticate(short).name == "alice"
    now[0] = T0 + 60 * SECOND
    assert store.authenticate(short) is None
    assert store.authenticate(forever).name == "alice"
    states = [(t.expires_us, t.state) for t in store.list_tokens("alice")]
    assert states == [(T0 + 60 * SECOND, "expired"), (None, "active")]


@pytest.mark.parametrize("lifetime", [0, -1, True, 1.5, "60", 10 * 365 * 86_400 + 1, 2**63])
def test_issue_token_rejects_bad_lifetimes(store: Store, lifetime: object) -> None:
    with pytest.raises(ValueError, match="expires_in_s"):
        store.issue_token("alice", expires_in_s=lifetime)  # type: ignore[arg-type]
    assert store.list_tokens("alice") == []
    assert store.authenticate(store.issue_token("alice", expires_in_s=10 * 365 * 86_400))


def test_revoke_tokens_refuses_every_token_of_the_account_at_once(store: Store) -> None:
    first, second = store.issue_token("alice"), store.issue_token("alice", expires_in_s=3600)
    other = store.issue_token("bob")
    assert store.authenticate(first) and store.authenticate(second)
    assert store.revoke_tokens("alice") == 2
    assert store.authenticate(first) is None
    assert store.authenticate(second) is None
    assert store.authenticate(other).name == "bob"
    assert store.revoke_tokens("alice") == 0
    assert [t.state for t in store.list_tokens("alice")] == ["revoked", "revoked"]
    assert all(t.revoked_us is not None for t in store.list_tokens("alice"))
    newer = store.issue_token("alice")  # revoking is not a ban: a new token works
    assert store.authenticate(newer).name == "alice"
    with pytest.raises(NotFound):
        store.revoke_tokens("nobody")


def test_list_tokens_names_tokens_without_their_secrets(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [T0]
    monkeypatch.setattr(store_module.clock, "now_us", lambda: now[0])
    token = store.issue_token("alice", expires_in_s=86_400)
    now[0] = T0 + 5 * SECOND
    store.authenticate(token)
    (record,) = store.list_tokens("alice")
    assert record.id == hashlib.sha256(token.encode()).hexdigest()[:8]
    assert (record.account, record.created_us, record.last_used_us) == ("alice", T0, now[0])
    assert record.expires_us == T0 + 86_400 * SECOND and record.revoked_us is None
    assert record.state == "active"
    assert token not in repr(record) and token[3:11] not in repr(record)
    assert store.list_tokens("bob") == []
    with pytest.raises(NotFound):
        store.list_tokens("nobody")


def test_downgrading_0004_drops_tokens_it_cannot_limit(store_url: str, store: Store) -> None:
    kept = store.issue_token("alice")
    store.issue_token("alice", expires_in_s=60)
    store.issue_token("bob")
    store.revoke_tokens("bob")
    command.downgrade(migrations_config(store_url), "0003")
    engine = make_engine(store_url)
    try:
        with engine.connect() as connection:
            digests = connection.execute(text("SELECT sha256 FROM tokens")).scalars().all()
    finally:
        engine.dispose()
    assert digests == [hashlib.sha256(kept.encode()).hexdigest()]


def test_authenticate_rejects_wrong_tokens(store: Store) -> None:
    token = store.issue_token("alice")
    assert store.authenticate(token + "x") is None
    assert store.authenticate(token[:8] + "A" * (len(token) - 8)) is None
    assert store.authenticate(token[:-1]) is None
    assert store.authenticate("") is None
    assert store.authenticate(token[:8]) is None
    assert store.authenticate("x" * 10_000) is None
    assert store.authenticate("\udc80" * 20) is None
    assert store.authenticate(None) is None  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.issue_token("nobody")


def test_authenticate_compares_in_constant_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = store.issue_token("alice")
    compared = []
    real_compare = store_module.hmac.compare_digest

    def spy(first: str, second: str) -> bool:
        compared.append((first, second))
        return real_compare(first, second)

    monkeypatch.setattr(store_module.hmac, "compare_digest", spy)
    assert store.authenticate(token).name == "alice"
    assert compared == [(hashlib.sha256(token.encode()).hexdigest(),) * 2]


def test_authenticate_records_last_use_at_most_once_a_minute(
    store: Store, database: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = store.issue_token("alice")
    now = [T0]
    monkeypatch.setattr(store_module.clock, "now_us", lambda: now[0])

    def last_used() -> int | None:
        with database.connect() as connection:
            return connection.execute(text("SELECT last_used_us FROM tokens")).scalar_one()

    assert last_used() is None
    store.authenticate(token)
    assert last_used() == T0
    now[0] = T0 + 59 * SECOND
    store.authenticate(token)
    assert last_used() == T0
    now[0] = T0 + 61 * SECOND
    store.authenticate(token)
    assert last_used() == T0 + 61 * SECOND


# -- credit ---------------------------------------------------------------------------


def test_credit(store: Store) -> None:
    account = store.credit("bob", 2_500_000, memo="welcome")
    assert account.name == "bob"
    assert account.balance_micro == 2_500_000
    assert store.balance("bob") == 2_500_000
    assert store.entries_sum("bob") == 2_500_000
    assert store.balance("mint") == -1_002_500_000
    store.check_ledger()


@pytest.mark.parametrize("amount", [0, -1, True, 1.5])
def test_credit_rejects_bad_amounts(store: Store, amount: object) -> None:
    with pytest.raises(ValueError):
        store.credit("alice", amount)  # type: ignore[arg-type]
    assert store.balance("alice") == 1_000_000_000


def test_credit_unknown_account(store: Store) -> None:
    with pytest.raises(NotFound, match="nobody"):
        store.credit("nobody", 5)
    with pytest.raises(NotFound):
        store.balance("nobody")
    with pytest.raises(NotFound):
        store.entries_sum("nobody")


# -- offers ---------------------------------------------------------------------------


def test_offer_ids_stay_stable_across_reconnects(store: Store) -> None:
    specs = [
        OfferSpec("RTX 4090", 1, 24_564, (0,), PRICE),
        OfferSpec("RTX 4090", 1, 24_564, [1], PRICE),
    ]
    first = store.replace_offers("bob", specs)
    assert [offer.gpu_indices for offer in first] == [(0,), (1,)]
    assert all(offer.active and offer.host == "bob" for offer in first)

    store.deactivate_offers("bob")
    assert store.list_offers() == []
    assert [offer.active for offer in store.list_offers(active_only=False)] == [False, False]

    again = store.replace_offers("bob", list(reversed(specs)))
    assert [offer.id for offer in again] == [first[1].id, first[0].id]
    assert {offer.id for offer in store.list_offers()} == {first[0].id, first[1].id}


def test_replace_offers_withdraws_missing_and_adds_changed(store: Store) -> None:
    (old,) = store.replace_offers("bob", [OfferSpec("A100", 2, 81_920, (0, 1), 500)])
    (new,) = store.replace_offers("bob", [OfferSpec("A100", 2, 81_920, (0, 1), 600)])
    assert new.id != old.id
    assert store.get_offer(old.id).active is False
    assert store.get_offer(new.id).price_per_second_micro == 600
    assert store.list_offers() == [store.get_offer(new.id)]
    assert store.replace_offers("bob", []) == []
    assert store.list_offers() == []


def test_cpu_only_offer(store: Store) -> None:
    (offer,) = store.replace_offers("bob", [OfferSpec("CPU", 0, 0, [], 1)])
    assert (offer.gpu_count, offer.gpu_indices) == (0, ())
    assert store.create_session("alice", "alice", offer.id, T0).gpu_indices == ()


def test_replace_offers_rejects_bad_input(store: Store) -> None:
    spec = OfferSpec("A100", 1, 81_920, (0,), 500)
    with pytest.raises(ValueError, match="twice"):
        store.replace_offers("bob", [spec, spec])
    with pytest.raises(NotFound):
        store.replace_offers("nobody", [spec])
    with pytest.raises(NotFound):
        store.get_offer(12_345)


@pytest.mark.parametrize(
    "fields",
    [
        {"gpu_model": ""},
        {"gpu_model": "x" * 200},
        {"gpu_count": 0},
        {"gpu_count": 2},
        {"gpu_indices": (-1,)},
        {"gpu_count": 2, "gpu_indices": (0, 0)},
        {"price_per_second_micro": -1},
        {"gpu_memory_mib": "lots"},
        {"price_per_second_micro": 1.5},
    ],
)
def test_offer_spec_validation(fields: dict) -> None:
    values = {
        "gpu_model": "A100",
        "gpu_count": 1,
        "gpu_memory_mib": 81_920,
        "gpu_indices": (0,),
        "price_per_second_micro": 500,
    }
    values.update(fields)
    with pytest.raises(ValueError):
        OfferSpec(**values)


# -- sessions -------------------------------------------------------------------------


def test_session_lifecycle(store: Store, offer_id: int, database: Engine) -> None:
    session = store.create_session("alice", "alice", offer_id, T0)
    assert session.id.startswith("s-") and len(session.id) == 18
    assert (session.state, session.renter, session.payer, session.host) == (
        STARTING,
        "alice",
        "alice",
        "bob",
    )
    assert session.price_per_second_micro == PRICE
    assert session.gpu_indices == (0,)
    assert store.get_session(session.id) == session

    ready = store.mark_ready(session.id, T0 + 2 * SECOND)
    assert ready.state == RUNNING
    assert ready.ready_us == ready.last_seen_us == T0 + 2 * SECOND
    assert store.mark_ready(session.id, T0 + 9 * SECOND) == ready
    assert store.get_session(session.id) == ready

    store.checkpoint_last_seen([(session.id, T0 + 30 * SECOND)])
    store.checkpoint_last_seen([(session.id, T0 + 20 * SECOND)])  # never goes back
    store.checkpoint_last_seen([])
    assert store.get_session(session.id).last_seen_us == T0 + 30 * SECOND

    ended = store.end_session(session.id, T0 + 62 * SECOND + 1, "stopped", fee_bps=1000)
    assert ended.state == ENDED
    assert ended.billed_seconds == 61  # 60 s and 1 us, rounded up
    assert ended.amount_micro == 61 * PRICE
    assert ended.end_reason == "stopped"
    assert store.get_session(session.id) == ended

    fee = 61 * PRICE * 1000 // 10_000
    assert store.balance("alice") == 1_000_000_000 - 61 * PRICE
    assert store.balance("bob") == 61 * PRICE - fee
    assert store.balance("platform-fee") == fee
    assert _count(database, "transactions", "session_id = :sid", sid=session.id) == 1
    store.check_ledger()

    store.checkpoint_last_seen([(session.id, T0 + 90 * SECOND)])  # ended: ignored
    assert store.get_session(session.id).last_seen_us == T0 + 30 * SECOND
    with pytest.raises(Conflict):
        store.mark_ready(session.id, T0)


def test_settlement_is_idempotent(store: Store, offer_id: int, database: Engine) -> None:
    session = store.create_session("alice", "alice", offer_id, T0)
    store.mark_ready(session.id, T0)
    ended = store.end_session(session.id, T0 + 10 * SECOND, "stopped", fee_bps=500)
    balances = {name: store.balance(name) for name in ("alice", "bob", "platform-fee")}
    for args in [
        (T0 + 10 * SECOND, "stopped", 500),
        (T0 + 99 * SECOND, "host lost", 0),
        (T0 + 99 * SECOND, "died", 99_999),  # a bad fee changes nothing either
    ]:
        assert store.end_session(session.id, *args) == ended
    assert {name: store.balance(name) for name in balances} == balances
    assert _count(database, "transactions", "kind = 'settlement'") == 1
    store.check_ledger()


def test_session_that_never_started_costs_nothing(
    store: Store, offer_id: int, database: Engine
) -> None:
    session = store.create_session("alice", "alice", offer_id, T0)
    ended = store.end_session(session.id, T0 + 100 * SECOND, "start failed: no GPU", fee_bps=1000)
    assert (ended.state, ended.billed_seconds, ended.amount_micro) == (ENDED, 0, 0)
    assert _count(database, "transactions", "kind = 'settlement'") == 0
    assert store.balance("alice") == 1_000_000_000


def test_free_and_instant_sessions_write_no_transaction(store: Store, database: Engine) -> None:
    (free,) = store.replace_offers("bob", [OfferSpec("T4", 1, 15_360, (3,), 0)])
    session = store.create_session("alice", "alice", free.id, T0)
    store.mark_ready(session.id, T0)
    assert store.end_session(session.id, T0 + 50 * SECOND, "stopped", 1000).amount_micro == 0
    (paid,) = store.replace_offers("bob", [OfferSpec("T4", 1, 15_360, (3,), 5)])
    session = store.create_session("alice", "alice", paid.id, T0)
    store.mark_ready(session.id, T0)
    assert store.end_session(session.id, T0 - SECOND, "stopped", 1000).billed_seconds == 0
    assert _count(database, "transactions", "kind = 'settlement'") == 0


def test_whole_fee_and_no_fee(store: Store, offer_id: int) -> None:
    ids = []
    for _ in range(2):
        session = store.create_session("alice", "alice", offer_id, T0)
        store.mark_ready(session.id, T0)
        ids.append(session.id)
    store.end_session(ids[0], T0 + SECOND, "stopped", fee_bps=10_000)
    assert (store.balance("bob"), store.balance("platform-fee")) == (0, PRICE)
    store.end_session(ids[1], T0 + SECOND, "stopped", fee_bps=0)
    assert (store.balance("bob"), store.balance("platform-fee")) == (PRICE, PRICE)
    store.check_ledger()


def test_end_session_rejects_bad_fee_and_keeps_session_open(store: Store, offer_id: int) -> None:
    session = store.create_session("alice", "alice", offer_id, T0)
    store.mark_ready(session.id, T0)
    with pytest.raises(ValueError, match="basis points"):
        store.end_session(session.id, T0 + SECOND, "stopped", fee_bps=10_001)
    assert store.get_session(session.id).state == RUNNING
    with pytest.raises(NotFound):
        store.end_session(session.id, T0 + SECOND, "stopped", 100, fee_account="nobody")
    assert store.get_session(session.id).state == RUNNING
    with pytest.raises(NotFound):
        store.end_session("s-0000000000000000", T0, "stopped", 100)


def test_end_reason_is_cut(store: Store, offer_id: int) -> None:
    session = store.create_session("alice", "alice", offer_id, T0)
    ended = store.end_session(session.id, T0, "x" * 1000, 100)
    assert ended.end_reason == "x" * 255
    assert store.get_session(session.id).end_reason == "x" * 255


def test_class_pays_for_a_student(store: Store, offer_id: int) -> None:
    store.ensure_account("physics-101", "teacher")
    store.credit("physics-101", 10_000_000)
    session = store.create_session("alice", "physics-101", offer_id, T0)
    store.mark_ready(session.id, T0)
    store.end_session(session.id, T0 + 10 * SECOND, "stopped", 0)
    assert store.balance("alice") == 1_000_000_000
    assert store.balance("physics-101") == 10_000_000 - 10 * PRICE
    assert [s.id for s in store.list_sessions(renter="alice")] == [session.id]


def test_create_session_checks(store: Store, offer_id: int) -> None:
    with pytest.raises(NotFound):
        store.create_session("alice", "alice", 12_345, T0)
    with pytest.raises(NotFound):
        store.create_session("nobody", "nobody", offer_id, T0)
    store.ensure_account("carol", "user")
    store.credit("carol", 59 * PRICE)
    with pytest.raises(InsufficientFunds):
        store.create_session("carol", "carol", offer_id, T0, minimum_seconds=60)
    assert store.create_session("carol", "carol", offer_id, T0, minimum_seconds=59)
    store.deactivate_offers("bob")
    with pytest.raises(Conflict, match="no longer available"):
        store.create_session("alice", "alice", offer_id, T0)


def test_list_sessions(store: Store, offer_id: int) -> None:
    store.ensure_account("carol", "user")
    store.ensure_account("dave", "host")
    (dave_offer,) = store.replace_offers("dave", [OfferSpec("T4", 1, 15_360, (0,), 1)])
    first = store.create_session("alice", "alice", offer_id, T0)
    second = store.create_session("carol", "carol", offer_id, T0 + 1)
    third = store.create_session("alice", "alice", dave_offer.id, T0 + 2)
    store.mark_ready(third.id, T0 + 3)
    store.end_session(first.id, T0 + 5, "stopped", 0)

    def ids(**filters: object) -> list[str]:
        return [session.id for session in store.list_sessions(**filters)]

    assert ids() == [third.id, second.id, first.id]
    assert ids(renter="alice") == [third.id, first.id]
    assert ids(host="bob") == [second.id, first.id]
    assert ids(renter="alice", host="dave") == [third.id]
    assert ids(states=[STARTING, RUNNING]) == [third.id, second.id]
    assert ids(states={ENDED}) == [first.id]
    assert ids(states=[]) == []
    assert ids(renter="nobody") == []
    assert ids(limit=1) == [third.id]


def test_checkpoint_many_sessions(store: Store, offer_id: int) -> None:
    sessions = [store.create_session("alice", "alice", offer_id, T0) for _ in range(50)]
    for session in sessions:
        store.mark_ready(session.id, T0)
    store.checkpoint_last_seen(
        [(session.id, T0 + number * SECOND) for number, session in enumerate(sessions)]
        + [("s-unknown", T0)]
    )
    for number, session in enumerate(sessions):
        assert store.get_session(session.id).last_seen_us == T0 + number * SECOND


def test_end_sessions_in_one_batch(store: Store, offer_id: int, database: Engine) -> None:
    sessions = [store.create_session("alice", "alice", offer_id, T0) for _ in range(5)]
    for session in sessions[1:]:
        store.mark_ready(session.id, T0)
    already = store.end_session(sessions[4].id, T0 + SECOND, "stopped", 1000)
    endings = [(session.id, T0 + 10 * SECOND, "host lost") for session in sessions]
    endings.append((sessions[1].id, T0 + 99 * SECOND, "twice"))
    ended = store.end_sessions(endings, fee_bps=1000)
    assert [record.id for record in ended] == [record[0] for record in endings]
    assert [record.amount_micro for record in ended] == [0, *[10 * PRICE] * 3, PRICE, 10 * PRICE]
    assert ended[4] == already
    assert ended[5] == ended[1]
    assert _count(database, "transactions", "kind = 'settlement'") == 4
    assert store.end_sessions([], fee_bps=0) == []
    assert store.end_sessions(endings, fee_bps=1000) == ended
    store.check_ledger()


def test_losing_the_settlement_race_returns_the_winner(
    store_url: str, store: Store, offer_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = store.create_session("alice", "alice", offer_id, T0)
    store.mark_ready(session.id, T0)
    with Store(store_url) as other_replica:
        winner = other_replica.end_session(session.id, T0 + 5 * SECOND, "stopped", 1000)

    def collide(*_args: object) -> None:
        raise IntegrityError("INSERT INTO transactions", {}, Exception("UNIQUE failed"))

    monkeypatch.setattr(store, "_settle", collide)
    assert store.end_session(session.id, T0 + 50 * SECOND, "died", 0) == winner
    assert store.end_sessions([(session.id, T0, "died"), (session.id, T0, "x")], 0) == [
        winner,
        winner,
    ]
    monkeypatch.undo()
    store.check_ledger()


def test_settlement_integrity_error_on_open_session_is_an_error(
    store: Store, offer_id: int, database: Engine
) -> None:
    session = store.create_session("alice", "alice", offer_id, T0)
    store.mark_ready(session.id, T0)
    with database.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO transactions (kind, session_id, created_us, memo) "
                "VALUES ('settlement', :sid, 0, 'stray')"
            ),
            {"sid": session.id},
        )
    with pytest.raises(StoreError, match="could not settle"):
        store.end_session(session.id, T0 + SECOND, "stopped", 0)
    assert store.get_session(session.id).state == RUNNING


def test_concurrent_settlement_creates_one_transaction(
    store_url: str, store: Store, offer_id: int, database: Engine
) -> None:
    sessions = [store.create_session("alice", "alice", offer_id, T0) for _ in range(10)]
    for session in sessions:
        store.mark_ready(session.id, T0)
    replicas = [Store(store_url), Store(store_url)]
    results: list[list] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def settle(replica_number: int) -> None:
        replica = replicas[replica_number]
        try:
            for session in sessions:
                barrier.wait(timeout=30)
                results[replica_number].append(
                    replica.end_session(
                        session.id, T0 + (7 + replica_number) * SECOND, "stopped", 1000
                    )
                )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=settle, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for replica in replicas:
        replica.close()
    assert not errors, errors
    assert results[0] == results[1]
    assert all(record.state == ENDED for record in results[0])
    for session in sessions:
        assert _count(database, "transactions", "session_id = :sid", sid=session.id) == 1
    assert _count(database, "entries") == 2 + 3 * len(sessions)  # the credit has 2 lines
    paid = sum(record.amount_micro for record in results[0])
    assert store.balance("alice") == 1_000_000_000 - paid
    store.check_ledger()


# -- checks ---------------------------------------------------------------------------


def test_check_ledger_finds_a_wrong_cached_balance(store: Store, database: Engine) -> None:
    store.check_ledger()
    with database.begin() as connection:
        connection.execute(
            text("UPDATE accounts SET balance_micro = balance_micro + 1 WHERE name = 'alice'")
        )
    with pytest.raises(StoreError, match="account 'alice' caches balance"):
        store.check_ledger()


def test_check_ledger_finds_an_unbalanced_transaction(store: Store, database: Engine) -> None:
    with database.begin() as connection:
        transaction_id = connection.execute(
            select(func.max(text("id"))).select_from(text("transactions"))
        ).scalar_one()
        connection.execute(
            text(
                "INSERT INTO entries (transaction_id, account_id, amount_micro) "
                "SELECT :tid, id, 0 FROM accounts WHERE name = 'bob'"
            ),
            {"tid": transaction_id},
        )
        connection.execute(
            text("UPDATE entries SET amount_micro = 5 WHERE amount_micro = 0"),
        )
    with pytest.raises(StoreError, match=f"transaction {transaction_id} sums to 5"):
        store.check_ledger()


def test_check_ledger_finds_an_empty_transaction(store: Store, database: Engine) -> None:
    with database.begin() as connection:
        connection.execute(
            text("INSERT INTO transactions (kind, created_us, memo) VALUES ('credit', 0, '')")
        )
    with pytest.raises(StoreError, match="has no entries"):
        store.check_ledger()


def test_caps_and_what_was_spent_since_a_day_began(store: Store, offer_id: int) -> None:
    from jupyter_gpu_share.store.caps import Caps

    assert store.get_caps("alice") == Caps()
    store.set_caps("alice", Caps(5_000_000, 20_000_000, 600))
    assert store.get_caps("alice") == Caps(5_000_000, 20_000_000, 600)
    assert store.caps_of(["alice", "bob"]) == {"alice": Caps(5_000_000, 20_000_000, 600)}
    with pytest.raises(NotFound):
        store.set_caps("nobody", Caps())
    session = store.create_session("alice", "alice", offer_id, T0)
    store.mark_ready(session.id, T0)
    ended = store.end_session(session.id, T0 + 10 * SECOND, "stopped", fee_bps=500)
    assert store.spent_since("alice", T0) == ended.amount_micro > 0
    # begun before a day's start: what it cost from then on (5 of its 10 s)
    assert store.spent_since("alice", T0 + 5 * SECOND) == 5 * PRICE
    assert store.spent_since("alice", T0 + 11 * SECOND) == 0  # ended before
    assert store.spent_since_many(["alice", "bob"], T0) == {"alice": ended.amount_micro, "bob": 0}
