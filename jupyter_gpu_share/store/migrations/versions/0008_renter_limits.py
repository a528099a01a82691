"""A renter's limits, kept by the broker (issue 18): spending caps per session and per
day, and how long a kernel may sit idle.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add accounts.cap_session_micro, cap_day_micro (NULL: no cap) and idle_limit_s
    (NULL: the broker's default; 0: never stopped for being idle).

    Plain ALTER TABLE, not a batch: SQLite would copy ``accounts``, which every other
    table refers to, and its foreign keys refuse the copy's DROP TABLE."""
    op.add_column("accounts", sa.Column("cap_session_micro", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("cap_day_micro", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("idle_limit_s", sa.Integer(), nullable=True))
    # What a payer spent since a day began (the daily cap) is read by when sessions ended.
    op.create_index(
        "ix_sessions_payer_account_id_ended_us", "sessions", ["payer_account_id", "ended_us"]
    )


def downgrade() -> None:
    """Drop them (ALTER TABLE ... DROP COLUMN: PostgreSQL, SQLite 3.35 and later)."""
    op.drop_index("ix_sessions_payer_account_id_ended_us", table_name="sessions")
    op.execute("ALTER TABLE accounts DROP COLUMN idle_limit_s")
    op.execute("ALTER TABLE accounts DROP COLUMN cap_day_micro")
    op.execute("ALTER TABLE accounts DROP COLUMN cap_session_micro")
