"""Keep a signed receipt of every settlement, chained by hash.

Sessions settled before this revision have no receipt; the chain starts at the first
settlement after it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create receipts."""
    op.create_table(
        "receipts",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_receipts_session_id_sessions"
        ),
        sa.PrimaryKeyConstraint("sequence", name="pk_receipts"),
        sa.UniqueConstraint("session_id", name="uq_receipts_session_id"),
    )


def downgrade() -> None:
    """Drop receipts."""
    op.drop_table("receipts")
