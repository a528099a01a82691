"""Record hosts' connections, for their reliability score.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create host_presence."""
    op.create_table(
        "host_presence",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_account_id", sa.Integer(), nullable=False),
        sa.Column("started_us", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_us", sa.BigInteger(), nullable=False),
        sa.Column("schedule", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["host_account_id"], ["accounts.id"], name="fk_host_presence_host_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_host_presence"),
    )
    op.create_index(
        "ix_host_presence_host_account_id_started_us",
        "host_presence",
        ["host_account_id", "started_us"],
    )


def downgrade() -> None:
    """Drop host_presence."""
    op.drop_table("host_presence")
