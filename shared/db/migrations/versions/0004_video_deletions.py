"""Video deletions as durable records, and media info per stored file.

Revision ID: 0004
Revises: 0003

``video_deletions``: one row per deleted video, written by the scheduler when it takes the
``video.deleted`` event; the runner records each finished step in ``steps_done`` (a
comma-separated list of step names), so a restart resumes where it stopped instead of
starting over, and an admin can read how far a deletion got.

``blobs`` gains the media info the scheduler probes once per content hash (status,
duration, thumbnail, why it failed): a video published after the probe finished copies it
from there and comes out ``ready`` at once. Nullable: NULL media_status means not probed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
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
        "video_deletions",
        sa.Column("video_id", sa.CHAR(26), nullable=False),
        sa.Column("content_hash", sa.CHAR(64), nullable=False),
        sa.Column("requested_at", _utc(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("steps_done", sa.String(255), nullable=False, server_default=sa.text("''")),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("video_id", name="pk_video_deletions"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_video_deletions_state", "video_deletions", ["state"])
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("media_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("duration_ms", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("failure_reason", sa.String(500), nullable=True))
        batch.add_column(sa.Column("has_thumbnail", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("has_thumbnail")
        batch.drop_column("failure_reason")
        batch.drop_column("duration_ms")
        batch.drop_column("media_status")
    op.drop_index("ix_video_deletions_state", table_name="video_deletions")
    op.drop_table("video_deletions")
