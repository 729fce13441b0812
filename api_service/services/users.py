"""Accounts: sign-up and look-ups."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from api_service.repositories.users import User, UserRepository
from api_service.repositories.videos import VideoRepository
from api_service.services.passwords import PasswordHasher
from api_service.services.spam import RateLimit
from shared.auth import Identity
from shared.db import Database, DuplicateKeyError, new_id
from shared.errors import ConflictError, NotFoundError, UnauthorizedError


class UserService:
    def __init__(
        self,
        *,
        db: Database,
        users: UserRepository,
        videos: VideoRepository,
        hasher: PasswordHasher,
        signup_limit: RateLimit,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._users = users
        self._videos = videos
        self._hasher = hasher
        self._signup_limit = signup_limit
        self._clock = clock

    async def sign_up(self, username: str, password: str, *, address: str) -> User:
        # Counted per client address before the hash: each sign-up costs one, and each new
        # account brings its own allowance of failed sign-ins.
        await self._signup_limit.hit(address)
        password_hash = await self._hasher.hash(password)
        user = User(
            id=new_id(),
            username=username,
            password_hash=password_hash,
            created_at=self._clock(),
            is_admin=False,
        )
        try:
            async with self._db.transaction() as conn:
                await self._users.add(conn, user)
        except DuplicateKeyError:
            raise ConflictError(
                f"The username {username!r} is taken.", code="username_taken"
            ) from None
        return user

    async def me(self, identity: Identity | None) -> User:
        if identity is None:
            raise UnauthorizedError("Sign in to see your account.", code="unauthorized")
        user = await self._users.by_id(identity.user_id)
        if user is None:
            # The account is gone but the token still verifies: treat it as signed out.
            raise UnauthorizedError("This account no longer exists.", code="unauthorized")
        return user

    async def profile(self, username: str) -> tuple[User, int]:
        """A user by name and how many videos they have."""
        user = await self._users.by_username(username)
        if user is None:
            raise NotFoundError(f"No user named {username!r}.", code="user_not_found")
        return user, await self._videos.count_by_owner(user.id)
