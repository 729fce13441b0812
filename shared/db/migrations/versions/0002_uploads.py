"""Finished uploads: the durable record a video is created from.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

Written out by hand, like 0001, so that it keeps meaning the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
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
        "uploads",
        sa.Column("id", sa.CHAR(26), nullable=False),
        sa.Column("owner_id", sa.CHAR(26), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_hash", sa.CHAR(64), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("instant", sa.Boolean(), nullable=False, server_default=sa.text("0")),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("completed_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_uploads"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_uploads_owner_id", "uploads", ["owner_id"])
    op.create_index("ix_uploads_content_hash", "uploads", ["content_hash"])


def downgrade() -> None:
    op.drop_table("uploads")
