"""Sign-in, token refresh with rotation and theft detection, sign-out.

Refresh tokens are 256-bit random strings; the database keeps only their SHA-256, so a
leaked table cannot be replayed. Each sign-in starts a *family*; every refresh spends the
presented token and adds the next one to the family. Presenting a spent token means two
parties hold it (one of them a thief), so the whole family is revoked, the newest token
too, and the access tokens of the family stop at the gateway at once.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from api_service.repositories.refresh_tokens import RefreshTokenRepository
from api_service.repositories.users import User, UserRepository
from api_service.services.passwords import PasswordHasher
from api_service.services.revocations import Revocations
from shared.auth import REFRESH_TOKEN_SECONDS, Identity, TokenSigner
from shared.db import Database, new_id
from shared.errors import RateLimitedError, UnauthorizedError
from shared.kv import KeyValueStore

# A client address may fail this many times more than one username: many people share
# an address (offices, mobile carriers), and a guesser spreads over many usernames.
PER_ADDRESS_FACTOR = 5


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type, not a secret


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LoginThrottle:
    """Counts failed sign-ins per username and per client address in a fixed window."""

    def __init__(self, kv: KeyValueStore, *, max_failures: int, window_seconds: int) -> None:
        self._kv = kv
        self._max = max_failures
        self._window = window_seconds

    def _keys(self, username: str, address: str) -> tuple[tuple[str, int], tuple[str, int]]:
        return (
            (f"login:fail:user:{username.lower()}", self._max),
            (f"login:fail:addr:{address}", self._max * PER_ADDRESS_FACTOR),
        )

    async def check(self, username: str, address: str) -> None:
        for key, limit in self._keys(username, address):
            count = await self._kv.get(key)
            if count is not None and int(count) >= limit:
                ttl = await self._kv.ttl(key)
                raise RateLimitedError(
                    "Too many failed sign-in attempts; try again later.",
                    retry_after=max(ttl, 1),
                    code="too_many_attempts",
                )

    async def failed(self, username: str, address: str) -> None:
        for key, _limit in self._keys(username, address):
            await self._kv.incr(key, ex=self._window)

    async def succeeded(self, username: str) -> None:
        await self._kv.delete(f"login:fail:user:{username.lower()}")


class SessionService:
    def __init__(
        self,
        *,
        db: Database,
        users: UserRepository,
        refresh_tokens: RefreshTokenRepository,
        hasher: PasswordHasher,
        signer: TokenSigner,
        kv: KeyValueStore,
        throttle: LoginThrottle,
        revocations: Revocations,
        refresh_lifetime: int = REFRESH_TOKEN_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._users = users
        self._refresh_tokens = refresh_tokens
        self._hasher = hasher
        self._signer = signer
        self._kv = kv
        self._throttle = throttle
        self._revocations = revocations
        self._refresh_lifetime = timedelta(seconds=refresh_lifetime)
        self._clock = clock

    async def sign_in(self, username: str, password: str, *, address: str) -> TokenPair:
        await self._throttle.check(username, address)
        user = await self._users.by_username(username)
        # Verified even for an unknown username (against a decoy), so both take as long.
        matched = await self._hasher.verify(user.password_hash if user else None, password)
        if user is None or not matched:
            await self._throttle.failed(username, address)
            raise UnauthorizedError("Wrong username or password.", code="invalid_credentials")
        await self._throttle.succeeded(username)
        if self._hasher.needs_rehash(user.password_hash):
            await self._users.set_password_hash(user.id, await self._hasher.hash(password))
        return await self._start_family(user)

    async def _start_family(self, user: User) -> TokenPair:
        family_id = new_id()
        refresh_token = secrets.token_urlsafe(32)
        async with self._db.transaction() as conn:
            await self._refresh_tokens.add(
                conn,
                token_hash=hash_refresh_token(refresh_token),
                family_id=family_id,
                user_id=user.id,
                created_at=self._clock(),
                expires_at=self._clock() + self._refresh_lifetime,
            )
        return self._pair(user, family_id, refresh_token)

    def _pair(self, user: User, family_id: str, refresh_token: str) -> TokenPair:
        access_token, _identity = self._signer.issue(
            user_id=user.id, username=user.username, family_id=family_id
        )
        return TokenPair(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_in=self._signer.lifetime,
        )

    async def refresh(self, presented: str) -> TokenPair:
        now = self._clock()
        token_hash = hash_refresh_token(presented)
        invalid = UnauthorizedError(
            "The refresh token is not valid; sign in again.", code="refresh_token_invalid"
        )
        record = await self._refresh_tokens.find(token_hash)
        if record is None or record.revoked_at is not None or record.expires_at <= now:
            raise invalid
        user = await self._users.by_id(record.user_id)
        if user is None:
            raise invalid
        next_token = secrets.token_urlsafe(32)
        async with self._db.transaction() as conn:
            # Conditional update: of two concurrent refreshes with one token, one wins.
            spent = await self._refresh_tokens.spend(conn, token_hash, now)
            if spent:
                await self._refresh_tokens.add(
                    conn,
                    token_hash=hash_refresh_token(next_token),
                    family_id=record.family_id,
                    user_id=user.id,
                    created_at=now,
                    expires_at=now + self._refresh_lifetime,
                )
        if not spent:
            await self._revoke_family(record.family_id)
            raise UnauthorizedError(
                "This refresh token was already used; every session of its sign-in is "
                "revoked. Sign in again.",
                code="refresh_token_reused",
            )
        return self._pair(user, record.family_id, next_token)

    async def sign_out(self, identity: Identity) -> None:
        """Revoke the presented access token now and the refresh family behind it."""
        await self._revocations.revoke_token(identity.token_id, expires_at=identity.expires_at)
        await self._revoke_family(identity.family_id)

    async def _revoke_family(self, family_id: str) -> None:
        # Every access token of the family expires within one access lifetime, so the
        # revocation only needs to outlive that.
        await self._revocations.revoke_family(family_id, seconds=self._signer.lifetime + 60)
        async with self._db.transaction() as conn:
            await self._refresh_tokens.revoke_family(conn, family_id, self._clock())
