"""Revoked token ids and refresh families, as kept in the database until they expire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, tuple_, update

from shared.db import Database, DuplicateKeyError
from shared.db.schema import token_revocations

# Rows read per query while restoring: the restore streams, however many there are.
RESTORE_BATCH = 500


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: str  # "jti" or "family"
    subject: str
    expires_at: datetime


class TokenRevocationRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, revocation: Revocation, *, now: datetime) -> datetime:
        """Records ``revocation`` (a repeat keeps the later expiry) and removes the rows
        that expired before ``now``, so the table holds only what can still matter.

        Returns the expiry recorded: ``revocation``'s, or the later one already there."""
        try:
            async with self._db.transaction() as conn:
                await conn.execute(
                    token_revocations.insert().values(
                        kind=revocation.kind,
                        subject=revocation.subject,
                        expires_at=revocation.expires_at,
                        revoked_at=now,
                    )
                )
                await conn.execute(
                    delete(token_revocations).where(token_revocations.c.expires_at <= now)
                )
        except DuplicateKeyError:
            # Revoked before (a family revoked by two replicas at once): keep the row,
            # with whichever expiry is later.
            names = (
                token_revocations.c.kind == revocation.kind,
                token_revocations.c.subject == revocation.subject,
            )
            async with self._db.transaction() as conn:
                await conn.execute(
                    update(token_revocations)
                    .where(*names, token_revocations.c.expires_at < revocation.expires_at)
                    .values(expires_at=revocation.expires_at)
                )
                recorded = await conn.scalar(select(token_revocations.c.expires_at).where(*names))
            return recorded or revocation.expires_at
        return revocation.expires_at

    async def unexpired(self, now: datetime) -> AsyncIterator[Revocation]:
        """Every revocation still in force at ``now``, read in batches by primary key."""
        after: tuple[str, str] | None = None
        table = token_revocations
        while True:
            query = (
                select(table.c.kind, table.c.subject, table.c.expires_at)
                .where(table.c.expires_at > now)
                .order_by(table.c.kind, table.c.subject)
                .limit(RESTORE_BATCH)
            )
            if after is not None:
                query = query.where(tuple_(table.c.kind, table.c.subject) > after)
            async with self._db.connect() as conn:
                rows = (await conn.execute(query)).all()
            for kind, subject, expires_at in rows:
                yield Revocation(kind=kind, subject=subject, expires_at=expires_at)
            if len(rows) < RESTORE_BATCH:
                return
            after = (rows[-1].kind, rows[-1].subject)
