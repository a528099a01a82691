"""Add classes, their members and notebooks, and the class a session is charged to.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the class tables and sessions.class_name."""
    op.create_table(
        "classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("quota_seconds", sa.BigInteger(), nullable=True),
        sa.Column("quota_micro", sa.BigInteger(), nullable=True),
        sa.Column("weekly_quota_seconds", sa.BigInteger(), nullable=True),
        sa.Column("gpu_model", sa.String(length=128), nullable=True),
        sa.Column("max_price_per_second_micro", sa.BigInteger(), nullable=True),
        sa.Column("starts_us", sa.BigInteger(), nullable=True),
        sa.Column("ends_us", sa.BigInteger(), nullable=True),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_classes_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_classes"),
        sa.UniqueConstraint("name", name="uq_classes_name"),
    )
    op.create_table(
        "class_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("added_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("role IN ('teacher', 'student')", name="ck_class_members_role"),
        sa.ForeignKeyConstraint(
            ["class_id"], ["classes.id"], name="fk_class_members_class_id_classes"
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_class_members_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_class_members"),
    )
    op.create_index("ix_class_members_account_id", "class_members", ["account_id"])
    op.create_index(
        "uq_class_members_class_id_account_id",
        "class_members",
        ["class_id", "account_id"],
        unique=True,
    )
    op.create_table(
        "class_notebooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["class_id"], ["classes.id"], name="fk_class_notebooks_class_id_classes"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_class_notebooks"),
    )
    op.create_index(
        "uq_class_notebooks_class_id_name", "class_notebooks", ["class_id", "name"], unique=True
    )
    op.add_column("sessions", sa.Column("class_name", sa.String(length=64), nullable=True))
    op.create_index("ix_sessions_class_name", "sessions", ["class_name"])


def downgrade() -> None:
    """Drop what upgrade added."""
    op.drop_index("ix_sessions_class_name", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("class_name")
    op.drop_table("class_notebooks")
    op.drop_table("class_members")
    op.drop_table("classes")
