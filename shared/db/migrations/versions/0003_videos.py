"""Videos, with full-text search over title and description.

Revision ID: 0003
Revises: 0002

Search: MySQL/MariaDB get a FULLTEXT index (InnoDB, natural-language mode), which stays
an index lookup at millions of rows. SQLite (standalone) gets an FTS5 table with the
trigram tokenizer, kept in step with ``videos`` by triggers; trigrams also match parts of
words and text without spaces (Chinese and Japanese titles), which FULLTEXT's default
parser does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MYSQL_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

SQLITE_SEARCH = [
    "CREATE VIRTUAL TABLE videos_search USING fts5("
    "title, description, content='videos', content_rowid='rowid', tokenize='trigram')",
    "CREATE TRIGGER videos_search_insert AFTER INSERT ON videos BEGIN "
    "INSERT INTO videos_search(rowid, title, description) "
    "VALUES (new.rowid, new.title, new.description); END",
    "CREATE TRIGGER videos_search_delete AFTER DELETE ON videos BEGIN "
    "INSERT INTO videos_search(videos_search, rowid, title, description) "
    "VALUES ('delete', old.rowid, old.title, old.description); END",
    "CREATE TRIGGER videos_search_update AFTER UPDATE OF title, description ON videos BEGIN "
    "INSERT INTO videos_search(videos_search, rowid, title, description) "
    "VALUES ('delete', old.rowid, old.title, old.description); "
    "INSERT INTO videos_search(rowid, title, description) "
    "VALUES (new.rowid, new.title, new.description); END",
]


# Searched columns compare without regard to case on MySQL: FULLTEXT follows the column's
# collation, and the tables' binary default would make "Piano" miss "piano".
CI = "utf8mb4_unicode_ci"


def _searchable(generic: Any, on_mysql: Any) -> Any:
    return generic.with_variant(on_mysql, "mysql", "mariadb")


def _utc() -> sa.DateTime:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "videos",
        sa.Column("id", sa.CHAR(26), nullable=False),
        sa.Column("owner_id", sa.CHAR(26), nullable=False),
        sa.Column("upload_id", sa.CHAR(26), nullable=False),
        sa.Column(
            "title", _searchable(sa.String(200), mysql.VARCHAR(200, collation=CI)), nullable=False
        ),
        sa.Column("description", _searchable(sa.Text(), mysql.TEXT(collation=CI)), nullable=False),
        sa.Column("content_hash", sa.CHAR(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default=sa.text("'processing'")),
        sa.Column("failure_reason", sa.String(500), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("has_thumbnail", sa.Boolean(), nullable=False, server_default=sa.text("0")),
        sa.Column("comment_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("deleted_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_videos"),
        sa.UniqueConstraint("upload_id", name="uq_videos_upload_id"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name="fk_videos_owner_id_users"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_videos_content_hash", "videos", ["content_hash"])
    op.create_index("ix_videos_owner_id_id", "videos", ["owner_id", "id"])
    op.create_index("ix_videos_deleted_at_id", "videos", ["deleted_at", "id"])
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for statement in SQLITE_SEARCH:
            op.execute(statement)
    else:
        op.execute(
            "CREATE FULLTEXT INDEX ftx_videos_title_description ON videos (title, description)"
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for trigger in ("videos_search_insert", "videos_search_delete", "videos_search_update"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute("DROP TABLE IF EXISTS videos_search")
    op.drop_table("videos")
