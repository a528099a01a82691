"""Give tokens a lifecycle: an expiry and a revocation time.

Existing tokens keep working: they get no expiry and keep their lookup prefix.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add tokens.expires_us and tokens.revoked_us."""
    op.add_column("tokens", sa.Column("expires_us", sa.BigInteger(), nullable=True))
    op.add_column("tokens", sa.Column("revoked_us", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Drop the two columns, deleting first every token they limit, so none comes back to life."""
    op.execute("DELETE FROM tokens WHERE revoked_us IS NOT NULL OR expires_us IS NOT NULL")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("revoked_us")
        batch.drop_column("expires_us")
