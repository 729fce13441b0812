"""Rows written straight to the database, for tests whose subject is not the API that
would normally make them (consumers, deletion runs)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from shared.db import Database, new_id
from shared.db.schema import users, videos


async def add_video(db: Database, *, deleted: bool = False) -> tuple[str, str]:
    """A new user and a ready video of theirs (soft-deleted if ``deleted``) over a content
    hash of its own; returns (user id, video id)."""
    now = datetime.now(UTC)
    user_id, video_id = new_id(), new_id()
    name = f"r{user_id[-12:]}".lower()
    async with db.transaction() as conn:
        await conn.execute(
            users.insert().values(
                id=user_id, username=name, username_key=name, password_hash="x", created_at=now
            )
        )
        await conn.execute(
            videos.insert().values(
                id=video_id,
                owner_id=user_id,
                upload_id=new_id(),
                title="t",
                description="",
                content_hash=secrets.token_hex(32),
                size=1,
                filename="f",
                status="ready",
                created_at=now,
                updated_at=now,
                deleted_at=now if deleted else None,
            )
        )
    return user_id, video_id
