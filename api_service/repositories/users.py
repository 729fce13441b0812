"""Users in the database. Usernames are unique regardless of case ("Alice" = "alice")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import Database
from shared.db.schema import users


@dataclass(frozen=True, slots=True)
class User:
    id: str
    username: str
    password_hash: str
    created_at: datetime
    is_admin: bool


def _user(row: RowMapping) -> User:
    return User(
        id=row["id"],
        username=row["username"],
        password_hash=row["password_hash"],
        created_at=row["created_at"],
        is_admin=bool(row["is_admin"]),
    )


class UserRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, conn: AsyncConnection, user: User) -> None:
        """Insert ``user``; ``DuplicateKeyError`` when the name is taken in any case."""
        await conn.execute(
            users.insert().values(
                id=user.id,
                username=user.username,
                username_key=user.username.lower(),
                password_hash=user.password_hash,
                created_at=user.created_at,
                is_admin=user.is_admin,
            )
        )

    async def by_username(self, username: str) -> User | None:
        # Public pages may lag; sign-in is a write request, so it reads the primary.
        async with self._db.reader() as conn:
            result = await conn.execute(
                select(users).where(users.c.username_key == username.lower())
            )
            row = result.mappings().first()
        return _user(row) if row else None

    async def by_id(self, user_id: str) -> User | None:
        # The primary: the caller's own account (just signed up, refreshing a session).
        async with self._db.connect() as conn:
            result = await conn.execute(select(users).where(users.c.id == user_id))
            row = result.mappings().first()
        return _user(row) if row else None

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                update(users).where(users.c.id == user_id).values(password_hash=password_hash)
            )
