"""Declarative models of the broker's database.

The schema is created and changed only by the Alembic migrations in ``migrations/``;
a test compares these models with the migrated database.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("user", "host", "teacher", "admin", "system")
SESSION_STATES = ("starting", "running", "ended")
TRANSACTION_KINDS = ("credit", "settlement")
VERSION_TABLE = "gpu_share_alembic_version"
"""Alembic's version table, named so the store can share a database with other apps."""

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements an INTEGER PRIMARY KEY, so big keys are INTEGER there.
BigIntegerKey = BigInteger().with_variant(Integer(), "sqlite")


def _in_list(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    """Base of every model; constraint names follow ``NAMING_CONVENTION``."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Account(Base):
    """A person, host, class or system account; ``balance_micro`` caches its entries' sum."""

    __tablename__ = "accounts"
    __table_args__ = (CheckConstraint(_in_list("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_us: Mapped[int] = mapped_column(BigInteger)
    balance_micro: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # A renter's own spending caps, enforced by the brokers (NULL: none).
    cap_session_micro: Mapped[int | None] = mapped_column(BigInteger)
    cap_day_micro: Mapped[int | None] = mapped_column(BigInteger)
    idle_limit_s: Mapped[int | None] = mapped_column(Integer)  # 0: never; NULL: the broker's


class Token(Base):
    """An API token, stored as its SHA-256 digest and a short lookup prefix, never in clear.

    ``prefix`` is the digest's first 8 hex digits (the token's public id); tokens issued
    before migration 0004 keep their own first 8 characters there, so they still match.
    """

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(8), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    created_us: Mapped[int] = mapped_column(BigInteger)
    last_used_us: Mapped[int | None] = mapped_column(BigInteger)
    expires_us: Mapped[int | None] = mapped_column(BigInteger)
    revoked_us: Mapped[int | None] = mapped_column(BigInteger)


class Offer(Base):
    """GPUs a host offers at a price; ids stay stable across the host's reconnects."""

    __tablename__ = "offers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    gpu_model: Mapped[str] = mapped_column(String(128))
    gpu_count: Mapped[int] = mapped_column(Integer)
    gpu_memory_mib: Mapped[int] = mapped_column(BigInteger)
    gpu_indices: Mapped[str] = mapped_column(Text)
    price_per_second_micro: Mapped[int] = mapped_column(BigInteger)
    active: Mapped[bool] = mapped_column(Boolean, index=True)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class Session(Base):
    """A rented kernel: who pays whom at what rate, and when it ran."""

    __tablename__ = "sessions"
    __table_args__ = (
        CheckConstraint(_in_list("state", SESSION_STATES), name="state"),
        Index("ix_sessions_renter_account_id_created_us", "renter_account_id", "created_us"),
        Index("ix_sessions_host_account_id_created_us", "host_account_id", "created_us"),
        Index("ix_sessions_payer_account_id_ended_us", "payer_account_id", "ended_us"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    renter_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    payer_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    host_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    offer_id: Mapped[int] = mapped_column(ForeignKey("offers.id"), index=True)
    price_per_second_micro: Mapped[int] = mapped_column(BigInteger)
    gpu_indices: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_us: Mapped[int] = mapped_column(BigInteger)
    ready_us: Mapped[int | None] = mapped_column(BigInteger)
    last_seen_us: Mapped[int | None] = mapped_column(BigInteger)
    ended_us: Mapped[int | None] = mapped_column(BigInteger)
    end_reason: Mapped[str | None] = mapped_column(String(255))
    billed_seconds: Mapped[int | None] = mapped_column(BigInteger)
    amount_micro: Mapped[int | None] = mapped_column(BigInteger)
    class_name: Mapped[str | None] = mapped_column(String(64), index=True)


class Transaction(Base):
    """A balanced group of entries; at most one settlement per session."""

    __tablename__ = "transactions"
    __table_args__ = (CheckConstraint(_in_list("kind", TRANSACTION_KINDS), name="kind"),)

    id: Mapped[int] = mapped_column(BigIntegerKey, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    session_id: Mapped[str | None] = mapped_column(ForeignKey("sessions.id"), unique=True)
    created_us: Mapped[int] = mapped_column(BigInteger)
    memo: Mapped[str] = mapped_column(Text, default="", server_default="")


class LedgerEntry(Base):
    """One signed amount on one account within a transaction."""

    __tablename__ = "entries"

    id: Mapped[int] = mapped_column(BigIntegerKey, primary_key=True)
    transaction_id: Mapped[int] = mapped_column(
        BigIntegerKey, ForeignKey("transactions.id"), index=True
    )
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)


class Receipt(Base):
    """The signed receipt of one settlement, a link of the receipts' hash chain."""

    __tablename__ = "receipts"

    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), unique=True)
    key_id: Mapped[str] = mapped_column(String(16))
    prev_hash: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    created_us: Mapped[int] = mapped_column(BigInteger)


class Classroom(Base):
    """A class: a budget account, a teacher, quotas per student and the GPU kind it may use."""

    __tablename__ = "classes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    quota_seconds: Mapped[int | None] = mapped_column(BigInteger)
    quota_micro: Mapped[int | None] = mapped_column(BigInteger)
    weekly_quota_seconds: Mapped[int | None] = mapped_column(BigInteger)
    gpu_model: Mapped[str | None] = mapped_column(String(128))
    max_price_per_second_micro: Mapped[int | None] = mapped_column(BigInteger)
    starts_us: Mapped[int | None] = mapped_column(BigInteger)
    ends_us: Mapped[int | None] = mapped_column(BigInteger)
    created_us: Mapped[int] = mapped_column(BigInteger)


class ClassMember(Base):
    """A teacher or a student of a class; students removed stay as inactive rows."""

    __tablename__ = "class_members"
    __table_args__ = (
        CheckConstraint("role IN ('teacher', 'student')", name="role"),
        Index("uq_class_members_class_id_account_id", "class_id", "account_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id"))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean)
    added_us: Mapped[int] = mapped_column(BigInteger)


class ClassNotebook(Base):
    """A starter notebook a teacher published to a class."""

    __tablename__ = "class_notebooks"
    __table_args__ = (Index("uq_class_notebooks_class_id_name", "class_id", "name", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id"))
    name: Mapped[str] = mapped_column(String(255))
    content: Mapped[str] = mapped_column(Text)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class HostPresence(Base):
    """One connection of a host: when it came and the last heartbeat checkpointed."""

    __tablename__ = "host_presence"
    __table_args__ = (
        Index("ix_host_presence_host_account_id_started_us", "host_account_id", "started_us"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    started_us: Mapped[int] = mapped_column(BigInteger)
    last_seen_us: Mapped[int] = mapped_column(BigInteger)
    schedule: Mapped[str | None] = mapped_column(String(255))


class Broker(Base):
    """A broker process on this database, and when it last said it was alive."""

    __tablename__ = "brokers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    public_url: Mapped[str | None] = mapped_column(String(512))
    started_us: Mapped[int] = mapped_column(BigInteger)
    seen_us: Mapped[int] = mapped_column(BigInteger)
    stopped_us: Mapped[int | None] = mapped_column(BigInteger)


class HostLease(Base):
    """Which broker owns a host, at which epoch (a fencing token), until when."""

    __tablename__ = "host_leases"

    host_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    broker_id: Mapped[str] = mapped_column(String(32))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_us: Mapped[int] = mapped_column(BigInteger)
    # What the host said in its last hello (JSON), for the brokers that do not serve it.
    profile: Mapped[str | None] = mapped_column(Text)
