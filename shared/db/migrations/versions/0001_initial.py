"""The first schema: users, refresh tokens, outbox, processed messages, blobs.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out by hand (not from ``shared.db.schema``) so that this migration keeps meaning
the same thing when the schema module moves on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MYSQL_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def _utc() -> sa.DateTime:
    # Naive UTC with microseconds; shared.db.schema.UtcDateTime adds the zone on reads.
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.CHAR(26), nullable=False),
        sa.Column("username", sa.String(32), nullable=False),
        sa.Column("username_key", sa.String(32), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
        sa.UniqueConstraint("username_key", name="uq_users_username_key"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_table(
        "refresh_tokens",
        sa.Column("id", sa.CHAR(64), nullable=False),
        sa.Column("family_id", sa.CHAR(26), nullable=False),
        sa.Column("user_id", sa.CHAR(26), nullable=False),
        sa.Column("expires_at", _utc(), nullable=False),
        sa.Column("spent_at", _utc(), nullable=True),
        sa.Column("revoked_at", _utc(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_refresh_tokens"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name="fk_refresh_tokens_user_id_users",
            ondelete="CASCADE",
        ),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_refresh_tokens_family_id", "refresh_tokens", ["family_id"])
    op.create_index("ix_refresh_tokens_user_id", "refresh_tokens", ["user_id"])
    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            autoincrement=True,
        ),
        sa.Column("event_id", sa.CHAR(36), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column(
            "payload",
            sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("sent_at", _utc(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_outbox_sent_at_id", "outbox", ["sent_at", "id"])
    op.create_table(
        "processed_messages",
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("processed_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", name="pk_processed_messages"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_processed_messages_processed_at", "processed_messages", ["processed_at"])
    op.create_table(
        "blobs",
        sa.Column("content_hash", sa.CHAR(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("ref_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("zero_since", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("content_hash", name="pk_blobs"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_blobs_zero_since", "blobs", ["zero_since"])


def downgrade() -> None:
    op.drop_table("blobs")
    op.drop_table("processed_messages")
    op.drop_table("outbox")
    op.drop_table("refresh_tokens")
    op.drop_table("users")
