"""The broker's store: accounts, tokens, offers, sessions and the double-entry ledger.

Every method is one database transaction and returns frozen records, never ORM objects.
Writers on SQLite begin ``IMMEDIATE`` (see ``engine.py``); on PostgreSQL a session being
settled is locked ``FOR UPDATE`` and account balances are updated in account-id order, so
several broker replicas can share one database. Settlements and ledger postings are Core
statements (compiled once by SQLAlchemy's cache, many rows each), and a background thread
checkpoints the WAL of a SQLite file database (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import weakref
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    bindparam,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from jupyter_gpu_share import clock
from jupyter_gpu_share.ledger import Entry, bill, can_start, credit_entries
from jupyter_gpu_share.ledger import settlement_entries as make_settlement_entries

from . import models
from .brokers import BrokerStore
from .caps import CapStore
from .checkpoint import WalCheckpointer
from .classes import ClassStore
from .engine import DEFAULT_BUSY_TIMEOUT_MS, make_engines
from .hosts import HostStore
from .receipts import INSERT_RECEIPT, LOCK_CHAIN, RECEIPT_HEAD, ReceiptStore, Signer, receipt_rows
from .records import (
    ENDED,
    RUNNING,
    STARTING,
    TOKEN_ACTIVE,
    TOKEN_EXPIRED,
    TOKEN_REVOKED,
    Account,
    Conflict,
    InsufficientFunds,
    NotFound,
    Offer,
    OfferSpec,
    SessionRecord,
    StoreError,
    StoreUnavailable,
    TokenRecord,
    decode_gpu_indices,
    encode_gpu_indices,
)

MIGRATIONS = Path(__file__).parent / "migrations"
FEE_ACCOUNT = "platform-fee"
MINT_ACCOUNT = "mint"
SYSTEM_ACCOUNTS = (FEE_ACCOUNT, MINT_ACCOUNT)
OUT_OF_DATE = "database schema is out of date; run: jupyter gpu-share broker --upgrade-db"

TOKEN_PREFIX_LENGTH = 8
TOKEN_MARK = "gs_"  # every token issued begins so: recognisable, and never with "-"
MAX_TOKEN_LENGTH = 512
MAX_TOKEN_LIFETIME_S = 10 * 365 * 86_400
LAST_USED_RESOLUTION_US = 60_000_000
MAX_END_REASON_LENGTH = 255
MAX_MEMO_LENGTH = 1000
# Any fixed number: the PostgreSQL advisory lock that serialises concurrent migrations.
MIGRATION_LOCK_KEY = 0x6770755F7368

_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")  # the alphabet of secrets.token_urlsafe

accounts = models.Account.__table__
tokens = models.Token.__table__
offers = models.Offer.__table__
sessions = models.Session.__table__
transactions = models.Transaction.__table__
entries = models.LedgerEntry.__table__

_renter = accounts.alias("renter")
_payer = accounts.alias("payer")
_host = accounts.alias("host")

_SELECT_SESSION = (
    select(
        sessions,
        _renter.c.name.label("renter_name"),
        _payer.c.name.label("payer_name"),
        _host.c.name.label("host_name"),
    )
    .join_from(sessions, _renter, sessions.c.renter_account_id == _renter.c.id)
    .join(_payer, sessions.c.payer_account_id == _payer.c.id)
    .join(_host, sessions.c.host_account_id == _host.c.id)
)
_SELECT_SESSION_BY_ID = _SELECT_SESSION.where(sessions.c.id == bindparam("session_id"))
_SELECT_SESSION_FOR_SETTLEMENT = _SELECT_SESSION_BY_ID.with_for_update(of=sessions)
# Sorted, so concurrent settlers lock session rows in the same order.
_SELECT_SESSIONS_FOR_SETTLEMENT = (
    _SELECT_SESSION.where(sessions.c.id.in_(bindparam("session_ids", expanding=True)))
    .order_by(sessions.c.id)
    .with_for_update(of=sessions)
)

_SELECT_OFFER = select(offers, accounts.c.name.label("host_name")).join_from(
    offers, accounts, offers.c.host_account_id == accounts.c.id
)

_AUTHENTICATE = (
    select(
        tokens.c.id.label("token_id"),
        tokens.c.sha256,
        tokens.c.last_used_us,
        tokens.c.expires_us,
        tokens.c.revoked_us,
        accounts.c.id,
        accounts.c.name,
        accounts.c.role,
        accounts.c.created_us,
        accounts.c.balance_micro,
    )
    .join_from(tokens, accounts, tokens.c.account_id == accounts.c.id)
    .where(tokens.c.prefix.in_(bindparam("prefixes", expanding=True)))
)
_TOUCH_TOKEN = (
    update(tokens)
    .where(
        tokens.c.id == bindparam("token_id"),
        or_(tokens.c.last_used_us.is_(None), tokens.c.last_used_us < bindparam("stale_before")),
    )
    .values(last_used_us=bindparam("used_us"))
)

_END_SESSION = (
    update(sessions)
    .where(sessions.c.id == bindparam("session_id"), sessions.c.state != ENDED)
    .values(
        state=ENDED,
        ended_us=bindparam("ended_us"),
        end_reason=bindparam("end_reason"),
        billed_seconds=bindparam("billed"),
        amount_micro=bindparam("amount"),
    )
)
_INSERT_SETTLEMENT = insert(transactions).values(
    kind="settlement",
    session_id=bindparam("session_id"),
    created_us=bindparam("created_us"),
    memo=bindparam("memo"),
)
_INSERT_SETTLEMENTS = _INSERT_SETTLEMENT.returning(transactions.c.id, transactions.c.session_id)
_INSERT_ENTRIES = insert(entries).values(
    transaction_id=bindparam("transaction_id"),
    account_id=bindparam("account_id"),
    amount_micro=bindparam("amount_micro"),
)
_ADD_TO_BALANCE = (
    update(accounts)
    .where(accounts.c.id == bindparam("target_id"))
    .values(balance_micro=accounts.c.balance_micro + bindparam("delta"))
)
_CHECKPOINT = (
    update(sessions)
    .where(
        sessions.c.id == bindparam("session_id"),
        sessions.c.state != ENDED,
        or_(sessions.c.last_seen_us.is_(None), sessions.c.last_seen_us < bindparam("seen_us")),
    )
    .values(last_seen_us=bindparam("seen_us"))
)


class _Ledger:
    """Runs the settlement and posting statements through ``Connection.execute``: Core
    statements, compiled once by SQLAlchemy's statement cache, many rows per statement
    (executemany). On PostgreSQL every statement is a round trip, so a batch of sessions
    shares each statement, and session rows are locked FOR UPDATE in id order."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def lock_sessions(self, session_ids: list[str]) -> list[Any]:
        """Return the rows of the sessions (with party names), locked for the transaction."""
        if len(session_ids) == 1:
            return self._connection.execute(
                _SELECT_SESSION_FOR_SETTLEMENT, {"session_id": session_ids[0]}
            ).all()
        return self._connection.execute(
            _SELECT_SESSIONS_FOR_SETTLEMENT, {"session_ids": session_ids}
        ).all()

    def end_sessions(self, updates: list[dict[str, Any]]) -> None:
        """Mark sessions ended with their bills."""
        self._connection.execute(_END_SESSION, updates)

    def insert_settlements(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        """Insert settlement transactions and return their ids by session id."""
        if len(rows) == 1:
            result = self._connection.execute(_INSERT_SETTLEMENT, rows[0])
            return {rows[0]["session_id"]: result.inserted_primary_key[0]}
        return {
            row.session_id: row.id for row in self._connection.execute(_INSERT_SETTLEMENTS, rows)
        }

    def post(self, entry_rows: list[dict[str, int]], balance_rows: list[dict[str, int]]) -> None:
        """Insert ledger entries and add deltas to cached balances."""
        self._connection.execute(_INSERT_ENTRIES, entry_rows)
        self._connection.execute(_ADD_TO_BALANCE, balance_rows)

    def lock_receipt_chain(self) -> None:
        """Hold the receipt chain until the transaction ends (before any account row)."""
        if self._connection.dialect.name == "postgresql":
            self._connection.execute(LOCK_CHAIN)

    def receipt_head(self) -> Any:
        """Return the last receipt's sequence and body, or None."""
        return self._connection.execute(RECEIPT_HEAD).first()

    def insert_receipts(self, rows: list[dict[str, Any]]) -> None:
        """Insert receipt rows."""
        self._connection.execute(INSERT_RECEIPT, rows)


def migrations_config(url: str) -> Config:
    """Return an Alembic configuration for the store's migrations, without alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def token_digest(token: str) -> str:
    """Return the SHA-256 hex digest stored for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """Return a new random token: ``gs_`` and 43 URL-safe characters (256 bits)."""
    return TOKEN_MARK + secrets.token_urlsafe(32)


def token_state(row: Any, now_us: int) -> str:
    """Return whether a token row is active, expired or revoked at ``now_us``."""
    if row.revoked_us is not None:
        return TOKEN_REVOKED
    if row.expires_us is not None and row.expires_us <= now_us:
        return TOKEN_EXPIRED
    return TOKEN_ACTIVE


def check_token_lifetime(expires_in_s: object) -> None:
    """Refuse a token lifetime that is not a whole number of seconds from 1 s to 10 years."""
    _check_int("expires_in_s", expires_in_s)
    if not 1 <= expires_in_s <= MAX_TOKEN_LIFETIME_S:  # type: ignore[operator]
        raise ValueError(
            f"expires_in_s must be from 1 to {MAX_TOKEN_LIFETIME_S} seconds (10 years), "
            f"not {expires_in_s}"
        )


def _account(row: Any) -> Account:
    return Account(
        id=row.id,
        name=row.name,
        role=row.role,
        created_us=row.created_us,
        balance_micro=row.balance_micro,
    )


def _offer(row: Any) -> Offer:
    return Offer(
        id=row.id,
        host=row.host_name,
        gpu_model=row.gpu_model,
        gpu_count=row.gpu_count,
        gpu_memory_mib=row.gpu_memory_mib,
        gpu_indices=decode_gpu_indices(row.gpu_indices),
        price_per_second_micro=row.price_per_second_micro,
        active=bool(row.active),
        updated_us=row.updated_us,
    )


def _session(row: Any) -> SessionRecord:
    return SessionRecord(
        id=row.id,
        renter=row.renter_name,
        payer=row.payer_name,
        host=row.host_name,
        offer_id=row.offer_id,
        price_per_second_micro=row.price_per_second_micro,
        gpu_indices=decode_gpu_indices(row.gpu_indices),
        state=row.state,
        created_us=row.created_us,
        ready_us=row.ready_us,
        last_seen_us=row.last_seen_us,
        ended_us=row.ended_us,
        end_reason=row.end_reason,
        billed_seconds=row.billed_seconds,
        amount_micro=row.amount_micro,
        class_name=row.class_name,
    )


def _ended_session(
    row: Any, ended_us: int, end_reason: str, seconds: int, amount_micro: int
) -> SessionRecord:
    """Return the record of an open session's row as it is once ended with this bill."""
    return replace(
        _session(row),
        state=ENDED,
        ended_us=ended_us,
        end_reason=end_reason,
        billed_seconds=seconds,
        amount_micro=amount_micro,
    )


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, not {value!r}")


def _post_entries(
    ledger: _Ledger,
    postings: list[tuple[int, list[Entry], Mapping[str, int]]],
) -> None:
    """Insert transactions' entries and add them to the cached balances."""
    entry_rows = []
    deltas: dict[int, int] = {}
    for transaction_id, lines, account_ids in postings:
        for line in lines:
            account_id = account_ids[line.account]
            entry_rows.append(
                {
                    "transaction_id": transaction_id,
                    "account_id": account_id,
                    "amount_micro": line.amount_micro,
                }
            )
            deltas[account_id] = deltas.get(account_id, 0) + line.amount_micro
    # Account-id order, so concurrent transactions lock rows in the same order.
    ledger.post(
        entry_rows,
        [{"target_id": account_id, "delta": deltas[account_id]} for account_id in sorted(deltas)],
    )


class Store(ClassStore, HostStore, ReceiptStore, BrokerStore, CapStore):
    """Durable state of the broker on SQLite or PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        upgrade: bool = False,
        echo: bool = False,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        signer: Signer | None = None,
    ) -> None:
        """Open the database at ``url``; migrate it when fresh, or when ``upgrade`` is set.

        With a ``signer`` every settlement writes its signed receipt in its own transaction.
        """
        self.url = url
        self._signer = signer
        self._writer, self._reader = make_engines(url, echo=echo, busy_timeout_ms=busy_timeout_ms)
        self._immediate = self._writer.dialect.name == "sqlite"
        # Accounts are never renamed or deleted, so name -> id can be cached for good.
        self._account_ids: dict[str, int] = {}
        self._checkpointer: WalCheckpointer | None = None
        try:
            self._prepare_schema(upgrade)
            for name in SYSTEM_ACCOUNTS:
                self.ensure_account(name, "system")
            if self.dialect == "sqlite" and self._reader is not self._writer:
                # A file database: WAL checkpoints (and their fsyncs) off the callers' path.
                self._checkpointer = WalCheckpointer(self._reader)
                self._checkpointer.start()
                weakref.finalize(self, self._checkpointer.stop)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite one that holds the write lock from its BEGIN.

        ``BEGIN IMMEDIATE`` (the writer engine's driver begins nothing itself, see
        engine.py): a deferred transaction that read and then wrote would fail at once with
        SQLITE_BUSY when another writer got in between. Emitted here rather than from a
        ``begin`` event, which would cost every statement of the engine some 13 %."""
        with self._writer.begin() as connection:
            if self._immediate:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection

    def __enter__(self) -> Store:
        """Return the store itself."""
        return self

    def __exit__(self, *_exc_info: object) -> None:
        """Close the store."""
        self.close()

    def close(self) -> None:
        """Stop the WAL checkpoints and close every pooled connection."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._writer.dispose()
        self._reader.dispose()

    @property
    def shared_connection(self) -> bool:
        """Whether every call shares one connection (in-memory SQLite): no two at once."""
        return self.dialect == "sqlite" and self._reader is self._writer

    @property
    def dialect(self) -> str:
        """Return the database's dialect name, ``sqlite`` or ``postgresql``."""
        return self._writer.dialect.name

    # -- schema -----------------------------------------------------------------------

    def _prepare_schema(self, upgrade: bool) -> None:
        config = migrations_config(self.url)
        heads = set(ScriptDirectory.from_config(config).get_heads())
        with self._write() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            context = MigrationContext.configure(
                connection, opts={"version_table": models.VERSION_TABLE}
            )
            current = set(context.get_current_heads())
            if current == heads:
                return
            known = {
                revision.revision
                for revision in ScriptDirectory.from_config(config).walk_revisions()
            }
            if current - known:
                raise StoreError(
                    f"database schema revision {', '.join(sorted(current - known))} is newer "
                    "than this version of jupyter-gpu-share knows; upgrade jupyter-gpu-share"
                )
            existing_tables = set(inspect(connection).get_table_names())
            fresh = not current and not existing_tables & set(models.Base.metadata.tables)
            if not (upgrade or fresh):
                raise StoreError(OUT_OF_DATE)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    # -- accounts ---------------------------------------------------------------------

    def ensure_account(self, name: str, role: str) -> Account:
        """Create an account if it is missing and return it."""
        if not isinstance(name, str) or not _ACCOUNT_NAME.fullmatch(name):
            raise ValueError(
                f"account name must be 1-64 characters of letters, digits and _.@-: {name!r}"
            )
        if role not in models.ROLES:
            raise ValueError(f"role must be one of {', '.join(models.ROLES)}: {role!r}")
        try:
            with self._write() as connection:
                row = connection.execute(select(accounts).where(accounts.c.name == name)).first()
                if row is None:
                    connection.execute(
                        insert(accounts).values(
                            name=name, role=role, created_us=clock.now_us(), balance_micro=0
                        )
                    )
                    row = connection.execute(select(accounts).where(accounts.c.name == name)).one()
        except IntegrityError:
            # Another process created it first.
            with self._reader.connect() as connection:
                row = connection.execute(select(accounts).where(accounts.c.name == name)).one()
        if row.role != role:
            raise Conflict(f"account {name!r} exists with role {row.role!r}, not {role!r}")
        self._account_ids[name] = row.id
        return _account(row)

    def get_account(self, name: str) -> Account | None:
        """Return the named account, or None."""
        with self._reader.connect() as connection:
            row = connection.execute(select(accounts).where(accounts.c.name == name)).first()
        return None if row is None else _account(row)

    def get_account_by_id(self, account_id: int) -> Account:
        """Return the account with this id."""
        with self._reader.connect() as connection:
            row = connection.execute(select(accounts).where(accounts.c.id == account_id)).first()
        if row is None:
            raise NotFound(f"no account with id {account_id}")
        return _account(row)

    def balance(self, account_name: str) -> int:
        """Return an account's balance in micro-credits."""
        with self._reader.connect() as connection:
            balance = connection.execute(
                select(accounts.c.balance_micro).where(accounts.c.name == account_name)
            ).scalar()
        if balance is None:
            raise NotFound(f"no account named {account_name!r}")
        return balance

    def _account_id(self, connection: Connection, name: str) -> int:
        account_id = self._account_ids.get(name)
        if account_id is None:
            account_id = connection.execute(
                select(accounts.c.id).where(accounts.c.name == name)
            ).scalar()
            if account_id is None:
                raise NotFound(f"no account named {name!r}")
            self._account_ids[name] = account_id
        return account_id

    # -- tokens -----------------------------------------------------------------------

    def issue_token(self, account_name: str, expires_in_s: int | None = None) -> str:
        """Make a new token for an account, valid for ``expires_in_s`` seconds (None: until
        revoked), and return it; only its digest is kept."""
        if expires_in_s is not None:
            check_token_lifetime(expires_in_s)
        token = new_token()
        digest = token_digest(token)
        created_us = clock.now_us()
        with self._write() as connection:
            account_id = self._account_id(connection, account_name)
            connection.execute(
                insert(tokens).values(
                    account_id=account_id,
                    prefix=digest[:TOKEN_PREFIX_LENGTH],
                    sha256=digest,
                    created_us=created_us,
                    expires_us=(
                        None if expires_in_s is None else created_us + expires_in_s * 1_000_000
                    ),
                )
            )
        return token

    def authenticate(
        self, token: str, touches: list[dict[str, int]] | None = None
    ) -> Account | None:
        """Return the account a token belongs to, or None for an unknown, expired or revoked
        token. Nothing is cached: a revoked token is refused from the next call on.

        The token's last-used time is written at most once a minute; with ``touches`` that
        write is appended there for ``touch_tokens`` instead, so authenticating only reads
        (the broker queues the touch rather than wait on a write lock for it)."""
        if (
            not isinstance(token, str)
            or not TOKEN_PREFIX_LENGTH < len(token) <= MAX_TOKEN_LENGTH
            or not _TOKEN.fullmatch(token)
        ):
            return None
        digest = token_digest(token)
        # New tokens are found by their digest's prefix, those issued before 0004 by their own.
        prefixes = sorted({digest[:TOKEN_PREFIX_LENGTH], token[:TOKEN_PREFIX_LENGTH]})
        with self._reader.connect() as connection:
            rows = connection.execute(_AUTHENTICATE, {"prefixes": prefixes}).all()
        match = None
        for row in rows:
            # Compare every candidate, in constant time, so timing tells nothing.
            if hmac.compare_digest(row.sha256, digest):
                match = row
        used_us = clock.now_us()
        if match is None or token_state(match, used_us) != TOKEN_ACTIVE:
            return None
        stale_before = used_us - LAST_USED_RESOLUTION_US
        if match.last_used_us is None or match.last_used_us < stale_before:
            touch = {"token_id": match.token_id, "used_us": used_us, "stale_before": stale_before}
            if touches is None:
                self.touch_tokens([touch])
            else:
                touches.append(touch)
        return _account(match)

    def touch_tokens(self, touches: list[dict[str, int]]) -> None:
        """Write tokens' last-used times collected by ``authenticate``."""
        if touches:
            with self._write() as connection:
                connection.execute(_TOUCH_TOKEN, touches)

    def list_tokens(self, account_name: str) -> list[TokenRecord]:
        """Return an account's tokens, oldest first, named by public ids (never the secrets)."""
        with self._reader.connect() as connection:
            account_id = self._account_id(connection, account_name)
            rows = connection.execute(
                select(tokens)
                .where(tokens.c.account_id == account_id)
                .order_by(tokens.c.created_us, tokens.c.id)
            ).all()
        now_us = clock.now_us()
        return [
            TokenRecord(
                id=row.sha256[:TOKEN_PREFIX_LENGTH],
                account=account_name,
                created_us=row.created_us,
                expires_us=row.expires_us,
                last_used_us=row.last_used_us,
                revoked_us=row.revoked_us,
                state=token_state(row, now_us),
            )
            for row in rows
        ]

    def revoke_tokens(self, account_name: str) -> int:
        """Revoke every active token of an account; return how many were revoked."""
        now_us = clock.now_us()
        with self._write() as connection:
            account_id = self._account_id(connection, account_name)
            result = connection.execute(
                update(tokens)
                .where(
                    tokens.c.account_id == account_id,
                    tokens.c.revoked_us.is_(None),
                    or_(tokens.c.expires_us.is_(None), tokens.c.expires_us > now_us),
                )
                .values(revoked_us=now_us)
            )
        return result.rowcount

    # -- credit -----------------------------------------------------------------------

    def credit(self, account_name: str, amount_micro: int, memo: str = "") -> Account:
        """Add credit to an account, paid from the mint, and return the account."""
        _check_int("amount_micro", amount_micro)
        if amount_micro <= 0:
            raise ValueError(f"amount to credit must be greater than zero: {amount_micro}")
        if len(memo) > MAX_MEMO_LENGTH:
            raise ValueError(f"memo is longer than {MAX_MEMO_LENGTH} characters")
        with self._write() as connection:
            account_ids = {
                MINT_ACCOUNT: self._account_id(connection, MINT_ACCOUNT),
                account_name: self._account_id(connection, account_name),
            }
            # Balances are 64-bit integers: a credit that would carry one past them (or the
            # mint's below) is refused, never stored as a float.
            for name, delta in ((account_name, amount_micro), (MINT_ACCOUNT, -amount_micro)):
                current = connection.execute(
                    select(accounts.c.balance_micro).where(accounts.c.id == account_ids[name])
                ).scalar_one()
                if not INT64_MIN <= int(current) + delta <= INT64_MAX:
                    raise Conflict(
                        f"crediting {amount_micro} would take the balance of {name!r} past "
                        "a 64-bit integer"
                    )
            transaction_id = connection.execute(
                insert(transactions).values(kind="credit", created_us=clock.now_us(), memo=memo)
            ).inserted_primary_key[0]
            self._post(
                connection,
                [
                    (
                        transaction_id,
                        credit_entries(MINT_ACCOUNT, account_name, amount_micro),
                        account_ids,
                    )
                ],
            )
            row = connection.execute(
                select(accounts).where(accounts.c.id == account_ids[account_name])
            ).one()
        return _account(row)

    def _post(
        self,
        connection: Connection,
        postings: list[tuple[int, list[Entry], Mapping[str, int]]],
    ) -> None:
        """Insert transactions' entries and add them to the cached balances."""
        _post_entries(_Ledger(connection), postings)

    # -- offers -----------------------------------------------------------------------

    def replace_offers(self, host_name: str, offers_wanted: Iterable[OfferSpec]) -> list[Offer]:
        """Make these the host's only active offers, keeping ids of offers seen before."""
        specs = list(offers_wanted)
        keys = []
        for spec in specs:
            if not isinstance(spec, OfferSpec):
                raise ValueError(f"offers must be OfferSpec records, not {type(spec).__name__}")
            keys.append(
                (spec.gpu_model, encode_gpu_indices(spec.gpu_indices), spec.price_per_second_micro)
            )
        if len(set(keys)) != len(keys):
            raise ValueError("the same offer (gpu_model, gpu_indices, price) is listed twice")
        updated_us = clock.now_us()
        with self._write() as connection:
            host_id = connection.execute(
                select(accounts.c.id).where(accounts.c.name == host_name).with_for_update()
            ).scalar()
            if host_id is None:
                raise NotFound(f"no account named {host_name!r}")
            known = {
                (row.gpu_model, row.gpu_indices, row.price_per_second_micro): row.id
                for row in connection.execute(
                    select(
                        offers.c.id,
                        offers.c.gpu_model,
                        offers.c.gpu_indices,
                        offers.c.price_per_second_micro,
                    )
                    .where(offers.c.host_account_id == host_id)
                    .order_by(offers.c.id.desc())
                )
            }
            connection.execute(
                update(offers)
                .where(offers.c.host_account_id == host_id, offers.c.active.is_(True))
                .values(active=False, updated_us=updated_us)
            )
            offer_ids = []
            for spec, key in zip(specs, keys, strict=True):
                values = {
                    "gpu_count": spec.gpu_count,
                    "gpu_memory_mib": spec.gpu_memory_mib,
                    "active": True,
                    "updated_us": updated_us,
                }
                offer_id = known.get(key)
                if offer_id is None:
                    offer_id = connection.execute(
                        insert(offers).values(
                            host_account_id=host_id,
                            gpu_model=key[0],
                            gpu_indices=key[1],
                            price_per_second_micro=key[2],
                            **values,
                        )
                    ).inserted_primary_key[0]
                else:
                    connection.execute(
                        update(offers).where(offers.c.id == offer_id).values(**values)
                    )
                offer_ids.append(offer_id)
        return [
            Offer(
                id=offer_id,
                host=host_name,
                gpu_model=spec.gpu_model,
                gpu_count=spec.gpu_count,
                gpu_memory_mib=spec.gpu_memory_mib,
                gpu_indices=spec.gpu_indices,
                price_per_second_micro=spec.price_per_second_micro,
                active=True,
                updated_us=updated_us,
            )
            for offer_id, spec in zip(offer_ids, specs, strict=True)
        ]

    def deactivate_offers(self, host_name: str) -> None:
        """Withdraw every offer of a host (it disconnected)."""
        with self._write() as connection:
            host_id = self._account_id(connection, host_name)
            connection.execute(
                update(offers)
                .where(offers.c.host_account_id == host_id, offers.c.active.is_(True))
                .values(active=False, updated_us=clock.now_us())
            )

    def list_offers(
        self, active_only: bool = True, hosts: Collection[str] | None = None
    ) -> list[Offer]:
        """Return offers by id, only the active ones unless told otherwise (of ``hosts``
        only, when given)."""
        query = _SELECT_OFFER.order_by(offers.c.id)
        if active_only:
            query = query.where(offers.c.active.is_(True))
        if hosts is not None:
            query = query.where(accounts.c.name.in_(sorted(hosts)))
        with self._reader.connect() as connection:
            return [_offer(row) for row in connection.execute(query)]

    def get_offer(self, offer_id: int) -> Offer:
        """Return one offer, active or not."""
        with self._reader.connect() as connection:
            row = connection.execute(_SELECT_OFFER.where(offers.c.id == offer_id)).first()
        if row is None:
            raise NotFound(f"no offer with id {offer_id}")
        return _offer(row)

    # -- sessions ---------------------------------------------------------------------

    def create_session(
        self,
        renter: str,
        payer: str,
        offer_id: int,
        now_us: int,
        *,
        minimum_seconds: int = 0,
        class_name: str | None = None,
    ) -> SessionRecord:
        """Record a new session on an active offer, at the offer's price, as "starting".

        With ``minimum_seconds`` the payer must afford that long (else InsufficientFunds).
        """
        with self._write() as connection:
            offer = connection.execute(_SELECT_OFFER.where(offers.c.id == offer_id)).first()
            if offer is None:
                raise NotFound(f"no offer with id {offer_id}")
            if not offer.active:
                raise Conflict(f"offer {offer_id} is no longer available")
            renter_id = self._account_id(connection, renter)
            payer_id = self._account_id(connection, payer)
            if minimum_seconds > 0:
                balance = connection.execute(
                    select(accounts.c.balance_micro).where(accounts.c.id == payer_id)
                ).scalar_one()
                if not can_start(balance, offer.price_per_second_micro, minimum_seconds):
                    raise InsufficientFunds(
                        f"account {payer!r} cannot pay for {minimum_seconds} seconds "
                        f"of offer {offer_id}"
                    )
            record = SessionRecord(
                id="s-" + secrets.token_hex(8),
                renter=renter,
                payer=payer,
                host=offer.host_name,
                offer_id=offer.id,
                price_per_second_micro=offer.price_per_second_micro,
                gpu_indices=decode_gpu_indices(offer.gpu_indices),
                state=STARTING,
                created_us=now_us,
                ready_us=None,
                last_seen_us=None,
                ended_us=None,
                end_reason=None,
                billed_seconds=None,
                amount_micro=None,
                class_name=class_name,
            )
            connection.execute(
                insert(sessions).values(
                    class_name=class_name,
                    id=record.id,
                    renter_account_id=renter_id,
                    payer_account_id=payer_id,
                    host_account_id=offer.host_account_id,
                    offer_id=offer.id,
                    price_per_second_micro=offer.price_per_second_micro,
                    gpu_indices=offer.gpu_indices,
                    state=STARTING,
                    created_us=now_us,
                )
            )
        return record

    def get_session(self, session_id: str) -> SessionRecord:
        """Return one session."""
        with self._reader.connect() as connection:
            row = connection.execute(_SELECT_SESSION_BY_ID, {"session_id": session_id}).first()
        if row is None:
            raise NotFound(f"no session with id {session_id!r}")
        return _session(row)

    def list_sessions(
        self,
        renter: str | None = None,
        host: str | None = None,
        states: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[SessionRecord]:
        """Return sessions, newest first, of a renter and/or a host, in some states."""
        query = _SELECT_SESSION.order_by(sessions.c.created_us.desc(), sessions.c.id.desc())
        if renter is not None:
            query = query.where(_renter.c.name == renter)
        if host is not None:
            query = query.where(_host.c.name == host)
        if states is not None:
            query = query.where(sessions.c.state.in_(list(states)))
        if limit is not None:
            query = query.limit(limit)
        with self._reader.connect() as connection:
            return [_session(row) for row in connection.execute(query)]

    def mark_ready(self, session_id: str, ready_us: int) -> SessionRecord:
        """Start billing a "starting" session; a running one is returned unchanged."""
        _check_int("ready_us", ready_us)
        with self._write() as connection:
            row = connection.execute(
                _SELECT_SESSION_FOR_SETTLEMENT, {"session_id": session_id}
            ).first()
            if row is None:
                raise NotFound(f"no session with id {session_id!r}")
            record = _session(row)
            if record.state == RUNNING:
                return record
            if record.state != STARTING:
                raise Conflict(f"session {session_id!r} has ended and cannot become ready")
            last_seen_us = max(ready_us, record.last_seen_us or ready_us)
            connection.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(state=RUNNING, ready_us=ready_us, last_seen_us=last_seen_us)
            )
        return replace(record, state=RUNNING, ready_us=ready_us, last_seen_us=last_seen_us)

    def checkpoint_last_seen(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Record when each session's host was last heard from (only ever moving forward)."""
        parameters = [
            {"session_id": session_id, "seen_us": seen_us} for session_id, seen_us in pairs
        ]
        if not parameters:
            return
        with self._write() as connection:
            connection.execute(_CHECKPOINT, parameters)

    def end_session(
        self,
        session_id: str,
        ended_us: int,
        end_reason: str,
        fee_bps: int,
        fee_account: str = FEE_ACCOUNT,
        *,
        fence: tuple[str, Mapping[str, int]] | None = None,
    ) -> SessionRecord:
        """End and settle a session once; an ended session is returned unchanged.

        Bills ceil(ended_us - ready_us) seconds at the session's price, debits the payer,
        credits the host less ``fee_bps`` and the fee account with the fee, all in one
        transaction. ``end_reason`` is cut to 255 characters. With a ``fence`` (the settling
        broker's id and the epochs of the host leases it holds), a session whose host
        another broker owns under a live lease is refused with ``LeaseHeld``.
        """
        endings = [(session_id, ended_us, end_reason)]
        return self.end_sessions(endings, fee_bps, fee_account, fence=fence)[0]

    def end_sessions(
        self,
        endings: Iterable[tuple[str, int, str]],
        fee_bps: int,
        fee_account: str = FEE_ACCOUNT,
        *,
        fence: tuple[str, Mapping[str, int]] | None = None,
    ) -> list[SessionRecord]:
        """End and settle many ``(session_id, ended_us, end_reason)`` in one transaction.

        Works as ``end_session`` on each (the first ending given for a session counts) and
        returns the records in the order given.
        """
        wanted = []
        for session_id, ended_us, end_reason in endings:
            _check_int("ended_us", ended_us)
            wanted.append((session_id, ended_us, str(end_reason)[:MAX_END_REASON_LENGTH]))
        if not wanted:
            return []
        try:
            with self._write() as connection:
                return self._settle(connection, wanted, fee_bps, fee_account, fence)
        except OperationalError as exc:
            # Locked past the busy timeout, the server gone, the disk full: nothing of the
            # transaction was committed, so the caller may settle the same ending again.
            raise StoreUnavailable(f"could not settle now: {exc.orig}") from exc
        except IntegrityError as exc:
            # Another broker replica settled some of them first: its settlements stand.
            if len(wanted) > 1:
                return [
                    self.end_session(*ending, fee_bps, fee_account, fence=fence)
                    for ending in wanted
                ]
            stored = self.get_session(wanted[0][0])
            if stored.state == ENDED:
                return [stored]
            raise StoreError(f"could not settle session {stored.id!r}: {exc.orig}") from exc

    def _settle(
        self,
        connection: Connection,
        wanted: list[tuple[str, int, str]],
        fee_bps: int,
        fee_account: str,
        fence: tuple[str, Mapping[str, int]] | None = None,
    ) -> list[SessionRecord]:
        session_ids = sorted(set(session_id for session_id, _, _ in wanted))
        signer = self._receipt_signer()
        settled: list[tuple[Any, int, str, int, int]] = []
        ledger = _Ledger(connection)
        rows_by_id = {row.id: row for row in ledger.lock_sessions(session_ids)}
        if fence is not None:
            live = {sid: row.host_name for sid, row in rows_by_id.items() if row.state != ENDED}
            if live:
                self.check_fence(connection, live, fence, self.lease_now_us())
        results: dict[str, SessionRecord] = {}
        session_updates = []
        postings = []
        for session_id, ended_us, end_reason in wanted:
            if session_id in results:
                continue
            row = rows_by_id.get(session_id)
            if row is None:
                raise NotFound(f"no session with id {session_id!r}")
            if row.state == ENDED:
                results[session_id] = _session(row)
                continue
            seconds, amount = bill(row.ready_us, ended_us, row.price_per_second_micro)
            lines = make_settlement_entries(
                row.payer_name, row.host_name, fee_account, amount, fee_bps
            )
            session_updates.append(
                {
                    "session_id": session_id,
                    "ended_us": ended_us,
                    "end_reason": end_reason,
                    "billed": seconds,
                    "amount": amount,
                }
            )
            if lines:
                account_ids = {
                    row.payer_name: row.payer_account_id,
                    row.host_name: row.host_account_id,
                    fee_account: self._account_id(connection, fee_account),
                }
                postings.append((session_id, lines, account_ids))
            results[session_id] = _ended_session(row, ended_us, end_reason, seconds, amount)
            if signer is not None:
                settled.append((row, ended_us, end_reason, seconds, amount))
        if settled:
            ledger.lock_receipt_chain()
        if session_updates:
            ledger.end_sessions(session_updates)
        transaction_ids: dict[str, int] = {}
        if postings:
            created_us = clock.now_us()
            transaction_ids = ledger.insert_settlements(
                [
                    {
                        "session_id": session_id,
                        "created_us": created_us,
                        "memo": f"session {session_id}",
                    }
                    for session_id, _, _ in postings
                ]
            )
            _post_entries(
                ledger,
                [
                    (transaction_ids[session_id], lines, account_ids)
                    for session_id, lines, account_ids in postings
                ],
            )
        if signer is not None and settled:
            head = ledger.receipt_head()
            ledger.insert_receipts(receipt_rows(signer, head, settled, transaction_ids, fee_bps))
        return [results[session_id] for session_id, _, _ in wanted]

    # -- checks -----------------------------------------------------------------------

    def entries_sum(self, account_name: str) -> int:
        """Return the sum of an account's ledger entries."""
        with self._reader.connect() as connection:
            account_id = self._account_id(connection, account_name)
            total = connection.execute(
                select(func.coalesce(func.sum(entries.c.amount_micro), 0)).where(
                    entries.c.account_id == account_id
                )
            ).scalar_one()
        return int(total)

    def check_ledger(self) -> None:
        """Raise StoreError unless every transaction balances and every cached balance is right."""
        totals = (
            select(entries.c.account_id, func.sum(entries.c.amount_micro).label("total"))
            .group_by(entries.c.account_id)
            .subquery()
        )
        with self._reader.connect() as connection:
            unbalanced = connection.execute(
                select(entries.c.transaction_id, func.sum(entries.c.amount_micro).label("total"))
                .group_by(entries.c.transaction_id)
                .having(func.sum(entries.c.amount_micro) != 0)
                .limit(10)
            ).all()
            wrong_balances = connection.execute(
                select(accounts.c.name, accounts.c.balance_micro, totals.c.total)
                .join_from(accounts, totals, accounts.c.id == totals.c.account_id, isouter=True)
                .where(accounts.c.balance_micro != func.coalesce(totals.c.total, 0))
                .limit(10)
            ).all()
            empty = connection.execute(
                select(transactions.c.id)
                .where(
                    ~select(entries.c.id)
                    .where(entries.c.transaction_id == transactions.c.id)
                    .exists()
                )
                .limit(10)
            ).all()
        problems = [
            f"transaction {row.transaction_id} sums to {row.total}, not 0" for row in unbalanced
        ]
        problems += [
            f"account {row.name!r} caches balance {row.balance_micro} "
            f"but its entries sum to {row.total or 0}"
            for row in wrong_balances
        ]
        problems += [f"transaction {row.id} has no entries" for row in empty]
        if problems:
            raise StoreError("ledger check failed: " + "; ".join(problems))


__all__ = ["FEE_ACCOUNT", "MINT_ACCOUNT", "Store", "migrations_config"]
