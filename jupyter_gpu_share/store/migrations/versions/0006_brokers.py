"""Several brokers on one database: the brokers, and which one owns each host.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create brokers and host_leases."""
    op.create_table(
        "brokers",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("public_url", sa.String(length=512), nullable=True),
        sa.Column("started_us", sa.BigInteger(), nullable=False),
        sa.Column("seen_us", sa.BigInteger(), nullable=False),
        sa.Column("stopped_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_brokers"),
    )
    op.create_table(
        "host_leases",
        sa.Column("host_account_id", sa.Integer(), nullable=False),
        sa.Column("broker_id", sa.String(length=32), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_account_id"], ["accounts.id"], name="fk_host_leases_host_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("host_account_id", name="pk_host_leases"),
    )


def downgrade() -> None:
    """Drop host_leases and brokers."""
    op.drop_table("host_leases")
    op.drop_table("brokers")
