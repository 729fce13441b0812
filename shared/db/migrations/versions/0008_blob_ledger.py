"""The blob ledger: a stored file is claimed before it is removed; uploads can expire.

Revision ID: 0008
Revises: 0007

``blobs.collecting_since`` is the collector's claim (a tombstone): set, committed, on a
row that stayed unreferenced past the grace period, before its files are touched; the
row goes once the files are gone. While it is set no video may take a reference, and a
completing upload that meets it takes the row over and makes sure the file is stored
(see ``scheduler_service.jobs.blob_collector``). Indexed: the collector looks for claims
a crash left half done.

``uploads.state`` gains ``expired``: a finished upload whose file was collected before
a video used it. Finished uploads whose blob row is already gone (collected before this
revision) are marked so here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    # Naive UTC with microseconds; shared.db.schema.UtcDateTime adds the zone on reads.
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("collecting_since", _utc(), nullable=True))
    op.create_index("ix_blobs_collecting_since", "blobs", ["collecting_since"])
    op.execute(
        "UPDATE uploads SET state = 'expired' WHERE state = 'complete' AND NOT EXISTS "
        "(SELECT 1 FROM blobs WHERE blobs.content_hash = uploads.content_hash)"
    )


def downgrade() -> None:
    # An expired upload was a complete one whose file is gone; the older code has no
    # other word for it.
    op.execute("UPDATE uploads SET state = 'complete' WHERE state = 'expired'")
    op.drop_index("ix_blobs_collecting_since", table_name="blobs")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("collecting_since")
