"""Comments and danmaku.

Revision ID: 0005
Revises: 0004

``comments``: listed per video oldest first (the ``(video_id, id)`` index is both the order
and the cursor). ``danmaku``: read per video by offset window (``(video_id, offset_ms)``),
written in batches by the scheduler; ``hidden`` marks text that matched a blocked word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MYSQL_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def _utc() -> sa.DateTime:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "comments",
        sa.Column("id", sa.CHAR(26), nullable=False),
        sa.Column("video_id", sa.CHAR(26), nullable=False),
        sa.Column("author_id", sa.CHAR(26), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_comments"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_comments_video_id_id", "comments", ["video_id", "id"])
    op.create_index("ix_comments_author_id", "comments", ["author_id"])
    op.create_table(
        "danmaku",
        sa.Column("id", sa.CHAR(26), nullable=False),
        sa.Column("video_id", sa.CHAR(26), nullable=False),
        sa.Column("author_id", sa.CHAR(26), nullable=False),
        sa.Column("offset_ms", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.String(100), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("color", sa.CHAR(7), nullable=False),
        sa.Column("hidden", sa.Boolean(), nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_danmaku"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_danmaku_video_id_offset_ms", "danmaku", ["video_id", "offset_ms"])
    op.create_index("ix_danmaku_author_id", "danmaku", ["author_id"])


def downgrade() -> None:
    op.drop_table("danmaku")
    op.drop_table("comments")
