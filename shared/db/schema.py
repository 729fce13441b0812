"""The tables every service agrees on, as SQLAlchemy Core objects.

This mirrors what the Alembic migrations create; the migrations are the source of truth
for the database, this module is what repositories query. A new migration updates both.

Every table is InnoDB, utf8mb4 with the binary collation on MySQL, so string comparison,
uniqueness and ordering are byte-exact there as they are on SQLite, whatever default the
operator's database was created with. Times are aware UTC datetimes in Python
(``UtcDateTime``), naive UTC ``DATETIME(6)`` on MySQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    CHAR,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

# Deterministic constraint names, so later migrations (and SQLite batch mode, which must
# name what it drops) can refer to them on both dialects.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MYSQL_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

SEARCH_COLLATION = "utf8mb4_unicode_ci"

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as naive UTC; read back as aware UTC on every dialect.

    A naive datetime is refused on the way in: its zone would be a guess.
    """

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            # Plain DATETIME drops the microseconds; TIMESTAMP ends in 2038 and converts
            # through the session time zone.
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one (UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return value.replace(tzinfo=UTC)


# Identity-bearing BIGINT that still autoincrements on SQLite, where only a column
# declared exactly INTEGER PRIMARY KEY aliases the rowid.
BigIntegerId = BigInteger().with_variant(Integer(), "sqlite")

users = Table(
    "users",
    metadata,
    Column("id", CHAR(26), primary_key=True),
    Column("username", String(32), nullable=False, unique=True),
    # The username lower-cased: unique, so "Alice" and "alice" cannot both sign up, and
    # looked up by, so sign-in ignores case; the same on both dialects, unlike collations.
    Column("username_key", String(32), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("is_admin", Boolean(), nullable=False, default=False, server_default=text("0")),
    **MYSQL_TABLE_OPTIONS,
)

# One row per refresh token, keyed by the SHA-256 of the token (the token itself is never
# stored, so a leaked table cannot be replayed). Rotation spends a token and issues the next one
# in the same family; presenting a spent token again revokes the whole family. A browser
# sign-in binds its family to a device: device_hash is the SHA-256 of the device id in the
# browser's cookie (NULL for API clients' families, bound to nothing).
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", CHAR(64), primary_key=True),
    Column("family_id", CHAR(26), nullable=False, index=True),
    Column(
        "user_id", CHAR(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("spent_at", UtcDateTime(), nullable=True),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("device_hash", CHAR(64), nullable=True),
    **MYSQL_TABLE_OPTIONS,
)

# Events written in the same transaction as the change that caused them; a relay
# publishes unsent rows in id order and stamps sent_at. The payload is the message body
# exactly as it will be published.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigIntegerId, primary_key=True, autoincrement=True),
    Column("event_id", CHAR(36), nullable=False, unique=True),
    Column("routing_key", String(255), nullable=False),
    Column("payload", Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime(), nullable=True),
    Column("attempts", Integer(), nullable=False, default=0, server_default=text("0")),
    Index("ix_outbox_sent_at_id", "sent_at", "id"),
    **MYSQL_TABLE_OPTIONS,
)

# A consumer inserts (consumer, message id) in the transaction that handles a message;
# the duplicate key on a redelivery tells it the work is already done.
processed_messages = Table(
    "processed_messages",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("processed_at", UtcDateTime(), nullable=False, index=True),
    **MYSQL_TABLE_OPTIONS,
)

# One row per stored file, keyed by its content hash; videos sharing a file share the row.
# zero_since is set when ref_count drops to 0, so the collector deletes only blobs that
# stayed unreferenced for a grace period. collecting_since (migration 0008) is the
# collector's claim, committed before it removes the files: no video may reference a
# claimed row, and an upload completing meanwhile takes the row over.
blobs = Table(
    "blobs",
    metadata,
    Column("content_hash", CHAR(64), primary_key=True),
    Column("size", BigInteger(), nullable=False),
    Column("ref_count", Integer(), nullable=False, default=0, server_default=text("0")),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("zero_since", UtcDateTime(), nullable=True, index=True),
    # Media info, probed once per file by the scheduler (migration 0004); NULL media_status
    # means not probed yet. A video published later copies it and is ready at once.
    Column("media_status", String(16), nullable=True),
    Column("duration_ms", BigInteger(), nullable=True),
    Column("failure_reason", String(500), nullable=True),
    Column("has_thumbnail", Boolean(), nullable=True),
    Column("collecting_since", UtcDateTime(), nullable=True, index=True),
    **MYSQL_TABLE_OPTIONS,
)

# The states of an ``uploads`` row.
UPLOAD_COMPLETE = "complete"
# Its file was collected before a video used it: it can no longer be published.
UPLOAD_EXPIRED = "expired"

# A finished upload, kept after its Redis state has expired: creating a video from an
# upload_id reads it (whose it is, which file). Only finished uploads are rows; one in
# progress lives in Redis. No foreign keys: the blob row may be collected and the user
# removed without rewriting this history, and stream_service never reads users.
uploads = Table(
    "uploads",
    metadata,
    Column("id", CHAR(26), primary_key=True),
    Column("owner_id", CHAR(26), nullable=False, index=True),
    Column("filename", String(255), nullable=False),
    Column("size", BigInteger(), nullable=False),
    Column("content_hash", CHAR(64), nullable=False, index=True),
    Column("chunk_size", Integer(), nullable=False),
    # Completed by proving possession of a stored blob rather than by sending the bytes.
    Column("instant", Boolean(), nullable=False, default=False, server_default=text("0")),
    # UPLOAD_COMPLETE, or UPLOAD_EXPIRED (migration 0008).
    Column("state", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("completed_at", UtcDateTime(), nullable=True),
    **MYSQL_TABLE_OPTIONS,
)

# A published video. Soft-deleted (deleted_at) first, so it leaves every read at once; the
# scheduler removes the row later. Ids sort by creation time, so "newest first" is
# ORDER BY id DESC and a cursor is the last id seen (stable under concurrent inserts).
videos = Table(
    "videos",
    metadata,
    Column("id", CHAR(26), primary_key=True),
    Column("owner_id", CHAR(26), ForeignKey("users.id"), nullable=False),
    # One video per finished upload: a second POST with the same upload is a conflict.
    Column("upload_id", CHAR(26), nullable=False, unique=True),
    # Case-insensitive on MySQL: FULLTEXT search follows the column's collation.
    Column(
        "title",
        String(200).with_variant(
            mysql.VARCHAR(200, collation=SEARCH_COLLATION), "mysql", "mariadb"
        ),
        nullable=False,
    ),
    Column(
        "description",
        Text().with_variant(mysql.TEXT(collation=SEARCH_COLLATION), "mysql", "mariadb"),
        nullable=False,
    ),
    Column("content_hash", CHAR(64), nullable=False, index=True),
    Column("size", BigInteger(), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("status", String(16), nullable=False, server_default=text("'processing'")),
    Column("failure_reason", String(500), nullable=True),
    Column("duration_ms", BigInteger(), nullable=True),
    Column("has_thumbnail", Boolean(), nullable=False, server_default=text("0")),
    Column("comment_count", Integer(), nullable=False, server_default=text("0")),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("deleted_at", UtcDateTime(), nullable=True),
    Index("ix_videos_owner_id_id", "owner_id", "id"),
    Index("ix_videos_deleted_at_id", "deleted_at", "id"),
    **MYSQL_TABLE_OPTIONS,
)

# One row per deleted video (migration 0004), written when the scheduler takes the
# video.deleted event. steps_done lists the finished steps (comma-separated), so a restart
# resumes rather than repeats, and an admin can see how far a deletion got.
video_deletions = Table(
    "video_deletions",
    metadata,
    Column("video_id", CHAR(26), primary_key=True),
    Column("content_hash", CHAR(64), nullable=False),
    Column("requested_at", UtcDateTime(), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("steps_done", String(255), nullable=False, server_default=text("''")),
    Column("attempts", Integer(), nullable=False, server_default=text("0")),
    Column("last_error", String(500), nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime(), nullable=True),
    **MYSQL_TABLE_OPTIONS,
)

# Comments on a video (migration 0005), listed oldest first: ids sort by creation time, so
# ORDER BY id within a video is the order and the cursor. videos.comment_count moves in the
# same transaction as each insert and delete. No foreign keys: the scheduler's deletion
# runner removes a deleted video's comments before its row.
comments = Table(
    "comments",
    metadata,
    Column("id", CHAR(26), primary_key=True),
    Column("video_id", CHAR(26), nullable=False),
    Column("author_id", CHAR(26), nullable=False, index=True),
    Column("content", Text(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_comments_video_id_id", "video_id", "id"),
    **MYSQL_TABLE_OPTIONS,
)

# Danmaku (migration 0005), written in batches by the scheduler from danmaku.created;
# Redis holds the readable copy first. hidden: the text matched a blocked word, so it is
# kept (for moderation) but never shown or pushed.
danmaku = Table(
    "danmaku",
    metadata,
    Column("id", CHAR(26), primary_key=True),
    Column("video_id", CHAR(26), nullable=False),
    Column("author_id", CHAR(26), nullable=False, index=True),
    Column("offset_ms", BigInteger(), nullable=False),
    Column("content", String(100), nullable=False),
    Column("mode", String(8), nullable=False),
    Column("color", CHAR(7), nullable=False),
    Column("hidden", Boolean(), nullable=False, server_default=text("0")),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_danmaku_video_id_offset_ms", "video_id", "offset_ms"),
    **MYSQL_TABLE_OPTIONS,
)

# Revoked access tokens (kind 'jti') and refresh families (kind 'family') (migration
# 0006), each kept until expires_at, when no access token it names can pass any more.
# Redis holds the copy the gateway reads; this is what it is restored from when Redis
# comes back empty. Rows past expires_at are removed as new ones are written.
token_revocations = Table(
    "token_revocations",
    metadata,
    Column("kind", String(8), primary_key=True),
    Column("subject", String(64), primary_key=True),
    Column("expires_at", UtcDateTime(), nullable=False, index=True),
    Column("revoked_at", UtcDateTime(), nullable=False),
    **MYSQL_TABLE_OPTIONS,
)
