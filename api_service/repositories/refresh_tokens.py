"""Refresh tokens, stored by the SHA-256 of the token (never the token itself)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import Database
from shared.db.schema import refresh_tokens


@dataclass(frozen=True, slots=True)
class RefreshTokenRecord:
    token_hash: str
    family_id: str
    user_id: str
    expires_at: datetime
    spent_at: datetime | None
    revoked_at: datetime | None
    # SHA-256 of the device id the family is bound to; None: bound to no device.
    device_hash: str | None = None


class RefreshTokenRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(
        self,
        conn: AsyncConnection,
        *,
        token_hash: str,
        family_id: str,
        user_id: str,
        created_at: datetime,
        expires_at: datetime,
        device_hash: str | None = None,
    ) -> None:
        await conn.execute(
            refresh_tokens.insert().values(
                id=token_hash,
                family_id=family_id,
                user_id=user_id,
                created_at=created_at,
                expires_at=expires_at,
                device_hash=device_hash,
            )
        )

    async def find(self, token_hash: str) -> RefreshTokenRecord | None:
        async with self._db.connect() as conn:
            result = await conn.execute(
                select(refresh_tokens).where(refresh_tokens.c.id == token_hash)
            )
            row = result.mappings().first()
        if row is None:
            return None
        return RefreshTokenRecord(
            token_hash=row["id"],
            family_id=row["family_id"],
            user_id=row["user_id"],
            expires_at=row["expires_at"],
            spent_at=row["spent_at"],
            revoked_at=row["revoked_at"],
            device_hash=row["device_hash"],
        )

    async def spend(self, conn: AsyncConnection, token_hash: str, now: datetime) -> bool:
        """Mark the token spent; False when it was already spent or revoked (a reuse)."""
        result = await conn.execute(
            update(refresh_tokens)
            .where(
                refresh_tokens.c.id == token_hash,
                refresh_tokens.c.spent_at.is_(None),
                refresh_tokens.c.revoked_at.is_(None),
            )
            .values(spent_at=now)
        )
        return result.rowcount == 1

    async def revoke_family(self, conn: AsyncConnection, family_id: str, now: datetime) -> None:
        await conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
