"""Refresh tokens bound to a device.

Revision ID: 0007
Revises: 0006

``refresh_tokens.device_hash``: the SHA-256 of the random device id a browser sign-in
(cookie mode) was given in its ``vod_device`` cookie, copied onto every token of the
family; a refresh must present the matching device cookie. NULL for the JSON flow of API
clients (the CLI, tus, scripts), whose tokens are bound to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("refresh_tokens") as batch:
        batch.add_column(sa.Column("device_hash", sa.CHAR(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("refresh_tokens") as batch:
        batch.drop_column("device_hash")
