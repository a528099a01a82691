"""What a host said in its hello, for the brokers that do not serve it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add host_leases.profile (JSON: kernels, schedule, and per offer its self-test
    result, sandbox and sharing)."""
    with op.batch_alter_table("host_leases") as batch:
        batch.add_column(sa.Column("profile", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop host_leases.profile."""
    with op.batch_alter_table("host_leases") as batch:
        batch.drop_column("profile")
