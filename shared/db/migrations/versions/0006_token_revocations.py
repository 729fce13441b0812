"""Revoked access tokens and refresh families, kept durably.

Revision ID: 0006
Revises: 0005

``token_revocations``: one row per revoked token id (``kind = 'jti'``) or refresh family
(``kind = 'family'``), until ``expires_at``, the moment no access token it names can
pass the gateway any more. Redis holds the copy the gateway reads; this table is what
that copy is restored from when Redis comes back empty (a restart, a flush).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0006"
down_revision: str | None = "0005"
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
        "token_revocations",
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("expires_at", _utc(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "subject", name="pk_token_revocations"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_token_revocations_expires_at", "token_revocations", ["expires_at"])


def downgrade() -> None:
    op.drop_table("token_revocations")
