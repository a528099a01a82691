"""Create accounts, tokens, offers, sessions, transactions and entries.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only autoincrements an INTEGER PRIMARY KEY, so big keys are INTEGER there.
BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the initial schema."""
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("balance_micro", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint(
            "role IN ('user', 'host', 'teacher', 'admin', 'system')", name="ck_accounts_role"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("name", name="uq_accounts_name"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=8), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("last_used_us", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_tokens_account_id_accounts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
    )
    op.create_index("ix_tokens_account_id", "tokens", ["account_id"])
    op.create_index("ix_tokens_prefix", "tokens", ["prefix"])
    op.create_table(
        "offers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_account_id", sa.Integer(), nullable=False),
        sa.Column("gpu_model", sa.String(length=128), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("gpu_indices", sa.Text(), nullable=False),
        sa.Column("price_per_second_micro", sa.BigInteger(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_account_id"], ["accounts.id"], name="fk_offers_host_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_offers"),
    )
    op.create_index("ix_offers_active", "offers", ["active"])
    op.create_index("ix_offers_host_account_id", "offers", ["host_account_id"])
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("renter_account_id", sa.Integer(), nullable=False),
        sa.Column("payer_account_id", sa.Integer(), nullable=False),
        sa.Column("host_account_id", sa.Integer(), nullable=False),
        sa.Column("offer_id", sa.Integer(), nullable=False),
        sa.Column("price_per_second_micro", sa.BigInteger(), nullable=False),
        sa.Column("gpu_indices", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("ready_us", sa.BigInteger(), nullable=True),
        sa.Column("last_seen_us", sa.BigInteger(), nullable=True),
        sa.Column("ended_us", sa.BigInteger(), nullable=True),
        sa.Column("end_reason", sa.String(length=255), nullable=True),
        sa.Column("billed_seconds", sa.BigInteger(), nullable=True),
        sa.Column("amount_micro", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("state IN ('starting', 'running', 'ended')", name="ck_sessions_state"),
        sa.ForeignKeyConstraint(
            ["renter_account_id"], ["accounts.id"], name="fk_sessions_renter_account_id_accounts"
        ),
        sa.ForeignKeyConstraint(
            ["payer_account_id"], ["accounts.id"], name="fk_sessions_payer_account_id_accounts"
        ),
        sa.ForeignKeyConstraint(
            ["host_account_id"], ["accounts.id"], name="fk_sessions_host_account_id_accounts"
        ),
        sa.ForeignKeyConstraint(["offer_id"], ["offers.id"], name="fk_sessions_offer_id_offers"),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    )
    op.create_index(
        "ix_sessions_renter_account_id_created_us",
        "sessions",
        ["renter_account_id", "created_us"],
    )
    op.create_index(
        "ix_sessions_host_account_id_created_us", "sessions", ["host_account_id", "created_us"]
    )
    op.create_index("ix_sessions_payer_account_id", "sessions", ["payer_account_id"])
    op.create_index("ix_sessions_offer_id", "sessions", ["offer_id"])
    op.create_index("ix_sessions_state", "sessions", ["state"])
    op.create_table(
        "transactions",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=True),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("memo", sa.Text(), server_default="", nullable=False),
        sa.CheckConstraint("kind IN ('credit', 'settlement')", name="ck_transactions_kind"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_transactions_session_id_sessions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_transactions"),
        sa.UniqueConstraint("session_id", name="uq_transactions_session_id"),
    )
    op.create_table(
        "entries",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("transaction_id", BIG_KEY, nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("amount_micro", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["transaction_id"], ["transactions.id"], name="fk_entries_transaction_id_transactions"
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_entries_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_entries"),
    )
    op.create_index("ix_entries_account_id", "entries", ["account_id"])
    op.create_index("ix_entries_transaction_id", "entries", ["transaction_id"])


def downgrade() -> None:
    """Drop the initial schema."""
    op.drop_table("entries")
    op.drop_table("transactions")
    op.drop_table("sessions")
    op.drop_table("offers")
    op.drop_table("tokens")
    op.drop_table("accounts")
